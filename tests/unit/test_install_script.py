"""scripts/install.sh says what it installs, one line per step, and keeps pip quiet."""

import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A stand-in for python3: `-c "import torch"` fails (a fresh machine), `-m pip ...` is recorded.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then exit 1; fi
echo "$*" >> "$CALLS"
"""


def test_install_names_each_step_and_runs_pip_quietly(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls)}, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        wanted = [line for line in f.read().splitlines() if line.strip() and not line.startswith("#")]
    assert [line.split(" ", 2)[1] for line in lines] == ["torch", str(len(wanted)), "gigatron", "done"], lines
    assert all(line.startswith("[install] ") for line in lines)
    assert "numpy, tokenizers, sentencepiece" in lines[1] and "transformers" in lines[1]
    pip_calls = calls.read_text().splitlines()
    assert len(pip_calls) == 3 and all(c.startswith("-m pip install -q ") for c in pip_calls)
    assert "torch==2.13.0" in pip_calls[0] and "-r requirements-dev.txt" in pip_calls[1]
