"""Build a real-English JSON-lines corpus offline from Python's standard library documentation.

Every importable standard-library module (and its public submodules) is rendered as plain text
with ``pydoc``; the text is cut into documents of a few paragraphs each and written one JSON object
per line (``{"text": ..., "title": ..., "id": ...}``). Nothing is downloaded, so the corpus can be
made anywhere Python runs. The result is deterministic for a given Python version.

    python tools/make_corpus.py --output corpus.jsonl --target-mb 35
"""

import argparse
import contextlib
import io
import json
import os
import pkgutil
import pydoc
import re
import sys
import warnings

# Modules whose import has visible side effects (opens a browser, prints, starts a GUI) or is slow.
_SKIP_PREFIXES = (
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "ensurepip", "venv", "__main__", "pydoc_data", "xxsubtype", "_",
)


def _module_names():
    names = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith(_SKIP_PREFIXES):
            continue
        names.add(name)
        try:
            with _quiet():
                module = __import__(name)
        except BaseException:  # noqa: BLE001 - an unimportable module is simply left out
            continue
        path = getattr(module, "__path__", None)
        if path:
            for info in pkgutil.walk_packages(path, prefix=name + ".", onerror=lambda _: None):
                leaf = info.name.rsplit(".", 1)[-1]
                if leaf.startswith("_") or ".test" in info.name or info.name.startswith(_SKIP_PREFIXES):
                    continue
                names.add(info.name)
    return sorted(names)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


def render_module(name):
    """Plain-text pydoc rendering of module ``name`` or None if it cannot be imported."""
    try:
        with _quiet():
            obj = pydoc.locate(name)
            if obj is None:
                return None
            text = pydoc.render_doc(obj, title="Python Library Documentation: %s", renderer=pydoc.plaintext)
            return _ADDRESS.sub("", text)  # object reprs carry memory addresses that differ per run
    except BaseException:  # noqa: BLE001
        return None


def split_documents(text, max_chars):
    """Cut ``text`` at blank lines into pieces of at most about ``max_chars`` characters."""
    docs, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) > max_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        docs.append("\n\n".join(current))
    return [d for d in docs if d.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="JSON-lines file to write")
    parser.add_argument("--target-mb", type=float, default=35.0,
                        help="stop once this many MB of JSON lines are written; if the documentation "
                             "is smaller, it is written again with each pass's documents cut "
                             "at a different size (default 35)")
    parser.add_argument("--max-doc-chars", type=int, default=6000,
                        help="largest document, in characters (default 6000)")
    args = parser.parse_args(argv)

    texts = []
    for name in _module_names():
        text = render_module(name)
        if text:
            texts.append((name, text))
    if not texts:
        raise SystemExit("no standard-library documentation could be rendered")

    target = int(args.target_mb * 1024 * 1024)
    tmp = args.output + ".tmp"
    written, count, pass_index = 0, 0, 0
    with open(tmp, "w", encoding="utf-8") as out:
        while written < target:
            # Later passes cut the same text at other sizes so documents are not exact repeats.
            max_chars = max(500, args.max_doc_chars // (1 + pass_index))
            for name, text in texts:
                for doc in split_documents(text, max_chars):
                    line = json.dumps({"id": count, "title": name, "text": doc}, ensure_ascii=False) + "\n"
                    out.write(line)
                    written += len(line.encode("utf-8"))
                    count += 1
                    if written >= target:
                        break
                if written >= target:
                    break
            pass_index += 1
    os.replace(tmp, args.output)
    print(f"wrote {count} documents, {written / 1e6:.1f} MB, from {len(texts)} modules "
          f"({pass_index} pass{'es' if pass_index > 1 else ''}) to {args.output}")


if __name__ == "__main__":
    main()
