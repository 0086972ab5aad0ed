"""tests/script_server.py: a script forked from the preloaded server behaves as `python script` does
(argv, environment, working directory, exit status, separate stdout/stderr, threads joined and
atexit handlers run at the end, a fresh random state, PYTHONWARNINGS and OMP_NUM_THREADS applied),
and a timeout kills it."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from script_server import run_python, run_script  # noqa: E402

SCRIPT = '''
import atexit, os, random, sys, threading, time, warnings
import torch
atexit.register(lambda: print("atexit"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread"))).start()
warnings.warn("careful")
print(sys.argv[1:], os.getcwd() == os.environ["EXPECT_CWD"], os.environ.get("RANK"), torch.get_num_threads())
print(random.random(), torch.rand(1).item())
print("to stderr", file=sys.stderr)
if sys.argv[1] == "sleep":
    time.sleep(60)
sys.exit(int(os.environ.get("CODE", "0")))
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return str(path)


def test_a_forked_script_runs_as_python_would(script, tmp_path):
    env = dict(os.environ, EXPECT_CWD=str(tmp_path), CODE="3", OMP_NUM_THREADS="1", RANK="0")
    for result in (run_python([script, "a", "b"], env=env, cwd=tmp_path, timeout=60),
                   subprocess.run([sys.executable, script, "a", "b"], env=env, cwd=tmp_path, timeout=60,
                                  capture_output=True, text=True)):
        assert result.returncode == 3, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "['a', 'b'] True 0 1" and lines[2:] == ["thread", "atexit"], result.stdout
        assert "UserWarning: careful" in result.stderr and "to stderr" in result.stderr
    quiet = run_python([script, "c"], env=dict(env, PYTHONWARNINGS="ignore", CODE="0"), cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "to stderr\n"


def test_ranks_run_together_with_fresh_random_states(script, tmp_path):
    env = dict(os.environ, EXPECT_CWD=os.getcwd())
    results = run_script(script, ["r"], [dict(env, RANK="0"), dict(env, RANK="1", CODE="5")], timeout=60,
                         preload="torch")
    assert [code for code, _ in results] == [0, 5]
    outputs = [out.splitlines() for _, out in results]  # stdout and stderr together
    firsts = [lines.index(next(line for line in lines if line.startswith("['r']"))) for lines in outputs]
    assert [lines[i].split()[2] for lines, i in zip(outputs, firsts)] == ["0", "1"]
    randoms = [lines[i + 1] for lines, i in zip(outputs, firsts)]
    assert randoms[0] != randoms[1]  # random, numpy and torch generators reseeded in each child


def test_a_script_past_its_timeout_is_killed(script, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_python([script, "sleep"], env=dict(os.environ, EXPECT_CWD=str(tmp_path)), cwd=tmp_path, timeout=3)
