"""Build a real-English JSON-lines corpus offline from Python's standard library documentation.

Every importable standard-library module (and its public submodules) is rendered as plain text
with ``pydoc``; the text is cut into documents of a few paragraphs each and written one JSON object
per line (``{"text": ..., "title": ..., "id": ...}``). Nothing is downloaded, so the corpus can be
made anywhere Python runs.

    python tools/make_corpus.py --output corpus.jsonl --target-mb 35

Nothing of the machine enters the corpus, and it is the same on every run for a given Python
version and set of importable modules:
- pydoc's FILE (the module's path), DATA (module-level values: ``os.environ``, ``sys.path``,
  ``site.USER_BASE``, the time zone ...) and MODULE REFERENCE (which follows $PYTHONDOCS) sections
  are left out;
- the modules are imported and rendered in a child process with an empty environment (a fixed
  HOME, PATH and locale, hash seed 0 so that set reprs keep one order), started in ``/`` without
  the user's site-packages;
- where this Python is installed (shown by a few function defaults, e.g. ``sys.executable``) is
  replaced by neutral words (``python3``, ``PREFIX``);
- as a last guard, any line that still holds a path or name of this machine (home and working
  directory, the temporary directory, user and host name) or the value of an environment variable
  of the calling process (8 characters or more; not the locale, terminal, shell or editor, whose
  values are ordinary words of the documentation) is dropped and counted.
"""

import argparse
import contextlib
import getpass
import io
import json
import os
import pkgutil
import pydoc
import re
import socket
import subprocess
import sys
import tempfile
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


class _PortableText(pydoc._PlainTextDoc):
    """pydoc's plain text without the sections that describe this machine or this process."""

    _LEFT_OUT = ("FILE", "DATA", "MODULE REFERENCE")

    def section(self, title, contents):
        return "" if title in self._LEFT_OUT else super().section(title, contents)


_RENDERER = _PortableText()


def render_module(name):
    """Plain-text pydoc rendering of module ``name`` (without FILE, DATA and MODULE REFERENCE) or
    None if it cannot be imported."""
    try:
        with _quiet():
            obj = pydoc.locate(name)
            if obj is None:
                return None
            text = pydoc.render_doc(obj, title="Python Library Documentation: %s", renderer=_RENDERER)
            return _ADDRESS.sub("", text)  # object reprs carry memory addresses that differ per run
    except BaseException:  # noqa: BLE001
        return None


_GENERIC_PATHS = {"/", "/tmp", "/usr", "/usr/local", "/usr/bin", "/usr/local/bin", "/nonexistent"}


def python_paths() -> list:
    """(path, neutral text) for where this Python is installed, longest first: function defaults
    such as ``platform.architecture(executable=sys.executable)`` show them."""
    found = {}
    for exe in (sys.executable, os.path.realpath(sys.executable)):
        found[exe] = "python3"
    for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
        for path in (prefix, os.path.realpath(prefix)):
            if path not in _GENERIC_PATHS:
                found.setdefault(path, "PREFIX")
    return sorted(((k, v) for k, v in found.items() if k), key=lambda kv: -len(kv[0]))


# Variables whose values are common words of the documentation itself ("en_US.UTF-8", "/bin/bash")
# and say nothing secret: their lines are not dropped, so the corpus stays the same across machines.
_COMMON_VARIABLES = {"LANG", "LANGUAGE", "TERM", "COLORTERM", "SHELL", "EDITOR", "VISUAL", "PAGER", "SHLVL", "_"}


def machine_strings(environ=None) -> list:
    """Strings that identify this machine or process: no corpus line may contain one."""
    environ = os.environ if environ is None else environ
    found = {os.path.expanduser("~"), os.getcwd(), os.path.realpath(os.getcwd()), tempfile.gettempdir()}
    for get in (getpass.getuser, socket.gethostname):
        try:
            value = get()
        except Exception:  # noqa: BLE001 - no user or host name to look for
            continue
        if value:
            found.update({f"/{value}", f"{value}@", f"@{value}"} if len(value) < 8 else {value})
    found.update(v for k, v in environ.items() if len(v) >= 8 and k not in _COMMON_VARIABLES
                 and not k.startswith("LC_"))
    return sorted(v for v in found if v and v not in _GENERIC_PATHS)


def make_portable(text, replacements, forbidden):
    """``text`` with this Python's install paths replaced by neutral words and without the lines
    holding one of the ``forbidden`` strings; returns it and the number of lines dropped."""
    for path, neutral in replacements:
        text = text.replace(path, neutral)
    kept, dropped = [], 0
    for line in text.split("\n"):
        if any(f in line for f in forbidden):
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


# The child that renders: nothing of the caller's environment, fixed locale and hash seed.
_CLEAN_ENV = {"HOME": "/nonexistent", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
              "PYTHONHASHSEED": "0", "TMPDIR": "/tmp"}
_CHILD_FLAG = "--render-in-clean-process"


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
    parser.add_argument("--modules", nargs="+", default=None,
                        help="render only these modules (default: the whole standard library)")
    parser.add_argument(_CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not getattr(args, _CHILD_FLAG[2:].replace("-", "_")):
        return _run_in_clean_process(argv if argv is not None else sys.argv[1:], args.output)

    forbidden = json.loads(sys.stdin.read())
    replacements = python_paths()
    texts, dropped = [], 0
    for name in args.modules or _module_names():
        text = render_module(name)
        if text:
            text, n = make_portable(text, replacements, forbidden)
            dropped += n
            texts.append((name, text))
    if not texts:
        raise SystemExit("no standard-library documentation could be rendered")
    if dropped:
        print(f"dropped {dropped} lines that named something of this machine", file=sys.stderr)

    target = int(args.target_mb * 1024 * 1024)
    tmp = args.output + ".tmp"  # the parent made the path absolute: this process runs in /
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


def _run_in_clean_process(argv, output) -> int:
    """Run this script again in a process that knows nothing of this one (see the module docstring)."""
    argv = list(argv)
    for i, item in enumerate(argv):  # the child runs in /: make the output path absolute
        if item == "--output" and i + 1 < len(argv):
            argv[i + 1] = os.path.abspath(argv[i + 1])
        elif item.startswith("--output="):
            argv[i] = "--output=" + os.path.abspath(item.split("=", 1)[1])
    flags = ["-s"] + (["-P"] if sys.version_info >= (3, 11) else [])  # no user site, no script folder
    env = dict(_CLEAN_ENV)
    # Some Python builds find their shared library only through it; its value is in the forbidden list,
    # so any line that would show it is dropped.
    if os.environ.get("LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    done = subprocess.run([sys.executable, *flags, os.path.abspath(__file__), *argv, _CHILD_FLAG],
                          input=json.dumps(machine_strings()), text=True, env=env, cwd="/")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
