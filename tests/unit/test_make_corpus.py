"""tools/make_corpus.py: the quickstart's corpus holds nothing of the machine and is the same on every run."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_corpus", os.path.join(ROOT, "tools", "make_corpus.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_text_leaves_out_environment_paths_and_data(monkeypatch):
    make_corpus = _load_tool()
    monkeypatch.setenv("GIGATRON_CANARY", "canary-7f3a9c2e-secret")
    text = make_corpus.render_module("os")
    assert "canary-7f3a9c2e-secret" not in text and "environ({" not in text
    assert "FILE" not in text.split("\n") and os.path.dirname(os.__file__) not in text  # no module path
    assert "getcwd()" in text and "NAME" in text  # the documentation itself is kept
    text = make_corpus.render_module("sys")
    assert sys.prefix not in text and sys.executable not in text


def _make(tmp_path, tag, seed):
    """Run the tool with a canary variable, its own HOME and working directory and hash seed."""
    work = tmp_path / f"work-{tag}"
    home = tmp_path / f"home-{tag}"
    work.mkdir()
    home.mkdir()
    canary = f"canary-{tag}-5be1d0a7-do-not-leak"
    env = {**os.environ, "GIGATRON_CANARY": canary, "HOME": str(home), "PYTHONHASHSEED": str(seed),
           "PYTHONDOCS": f"https://{tag}.example.invalid/docs"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_corpus.py"), "--output", "corpus.jsonl",
                           "--target-mb", "4"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = (work / "corpus.jsonl").read_bytes()
    return data, [canary, str(work), str(home), str(tmp_path), f"{tag}.example.invalid", sys.prefix,
                  os.path.realpath(sys.prefix), os.path.dirname(os.path.realpath(sys.executable))]


def test_corpus_holds_nothing_of_the_machine_and_is_deterministic(tmp_path):
    first, secrets_a = _make(tmp_path, "alpha", 1)
    second, secrets_b = _make(tmp_path, "beta", 2)
    text = first.decode("utf-8")
    for secret in secrets_a + secrets_b + [os.path.expanduser("~")]:
        assert secret not in text, secret
    assert first == second  # same bytes whatever the environment, folder or hash seed
    titles = {json.loads(line)["title"] for line in text.splitlines()}
    assert len(titles) > 50 and "argparse" in titles
