"""Run Python scripts in fresh processes without paying their imports of torch (and megatron.core)
each time.

Importing torch takes 2-3 s of CPU, torch.distributed.checkpoint and megatron.core several more, and
the suite starts a hundred processes that do (the Megatron-Core oracles, convert.py and the other
command-line tools). A server process (this file run as a script; one per preload profile and
pytest process, started on first use) imports them once; each request forks one child per rank
from it. A child is a fresh process as far as a test can tell: it starts from the server's state
(nothing but the imports; the random generators are reseeded as a new process's are), runs the
script as `__main__` with its own argv, environment and working directory, its output goes to its
own files, and it ends the way the interpreter ends (non-daemon threads joined, atexit handlers
run). The pytest process itself imports nothing of it (megatron.core must never be imported there,
see tests/megatron_oracle.py).

    run_script(script, argv, envs, timeout, preload="megatron") -> [(returncode, output) per env]
        all children of one request run at the same time (the ranks of one gloo group)
    run_python([script, *argv], env=None, cwd=None, timeout=None, preload="torch")
        -> subprocess.CompletedProcess with text stdout and stderr, as
           subprocess.run([sys.executable, script, *argv], capture_output=True, text=True) gives

Profiles: "megatron" (the oracles: torch and megatron.core) and "torch" (our own tools: torch,
torch.distributed.checkpoint and numpy only, so that a tool never runs with megatron.core
imported). A child still running after `timeout` seconds is killed and subprocess.TimeoutExpired
is raised. GIGATRON_TEST_FORK_SERVER=0 starts every script with a plain `python script` instead.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import threading

PRELOADS = {
    # What the Megatron-Core oracle scripts import (everything slow to import; the rest is cheap).
    "megatron": (
        "numpy", "torch", "torch.distributed", "megatron.core", "megatron.core.parallel_state",
        "megatron.core.models.gpt", "megatron.core.models.gpt.gpt_layer_specs",
        "megatron.core.models.bert.bert_model", "megatron.core.models.bert.bert_layer_specs",
        "megatron.core.models.T5", "megatron.core.dist_checkpointing", "megatron.core.distributed",
        "megatron.core.optimizer", "megatron.core.optimizer_param_scheduler",
        "megatron.core.transformer.transformer_config", "megatron.core.datasets.blended_megatron_dataset_builder",
        "megatron.core.datasets.gpt_dataset", "megatron.core.models.mamba", "megatron.core.ssm.mamba_block",
    ),
    # What our command-line tools spend their start-up importing.
    "torch": ("numpy", "torch", "torch.distributed", "torch.distributed.checkpoint"),
}


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


# ------------------------------------------------------------------ client (the pytest process)

_lock = threading.Lock()
_servers: dict = {}  # preload profile -> subprocess.Popen
children_cpu_s = 0.0  # CPU seconds of the finished children (they are the servers', not this process's)


def _enabled() -> bool:
    return os.environ.get("GIGATRON_TEST_FORK_SERVER", "1") != "0"


def _get_server(preload: str) -> subprocess.Popen:
    server = _servers.get(preload)
    if server is None or server.poll() is not None:
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__), preload], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=_server_env(),
                                  start_new_session=True)  # its own process group: see _kill_server
        _servers[preload] = server
        atexit.register(_stop_server, server)
    return server


def _server_env() -> dict:
    """The pytest process's environment less what a child takes from its own (_startup_settings)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "OMP_NUM_THREADS")}


def _stop_server(server: subprocess.Popen) -> None:
    """At exit: end of input tells the server to exit; reap it."""
    try:
        server.stdin.close()
        server.wait(timeout=30)
    except Exception:
        _kill_server(server)


def _kill_server(server: subprocess.Popen) -> None:
    """Kill a server and the children it forked (its process group); the next request starts a new one."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    server.wait()
    for name, running in list(_servers.items()):
        if running is server:
            del _servers[name]


def _request(preload: str, script: str, argv: list, envs: list, cwd: str, timeout: float, separate: bool):
    """Fork len(envs) children running `script argv`; returns (codes, timed out, [(stdout, stderr)])."""
    global children_cpu_s
    with _lock, tempfile.TemporaryDirectory(prefix="script_server_") as tmp:
        outputs = [(os.path.join(tmp, f"rank{rank}.out"), os.path.join(tmp, f"rank{rank}.err") if separate else None)
                   for rank in range(len(envs))]
        server = _get_server(preload)
        try:
            _send(server.stdin, {"script": script, "argv": argv, "envs": envs, "outputs": outputs, "cwd": cwd,
                                 "timeout": timeout})
            reply = _receive(server.stdout)
        except BaseException:  # interrupted mid-request: its reply would answer the next request
            _kill_server(server)
            raise
        if reply is None:
            _kill_server(server)
            raise RuntimeError(f"the script server exited ({server.returncode}) while running {script}")
        children_cpu_s += reply["cpu_s"]
        texts = []
        for out, err in outputs:
            texts.append(tuple(_read(path) for path in (out, err)))
    return reply["codes"], reply["timed_out"], texts


def _read(path) -> str:
    if path is None:
        return ""
    with open(path, errors="replace") as handle:
        return handle.read()


def run_script(script: str, argv, envs, timeout: float = 300, preload: str = "megatron") -> list:
    """Run `python script *argv` once per environment in `envs` (all at once); return each run's
    (returncode, combined stdout and stderr)."""
    script, argv, envs = os.path.abspath(script), [str(a) for a in argv], [dict(e) for e in envs]
    if not _enabled():
        return _run_plain(script, argv, envs, timeout)
    codes, timed_out, texts = _request(preload, script, argv, envs, os.getcwd(), timeout, separate=False)
    if timed_out:
        raise subprocess.TimeoutExpired([sys.executable, script, *argv], timeout,
                                        output="\n".join(out for out, _ in texts))
    return [(code, out) for code, (out, _) in zip(codes, texts)]


def run_python(args, env=None, cwd=None, timeout=None, preload: str = "torch") -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd,
    timeout=timeout)` for args = [script, *argv], the script forked from a server that has imported
    torch already."""
    args = [str(a) for a in args]
    if not _enabled():
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout)
    script = os.path.abspath(os.path.join(cwd or os.getcwd(), args[0]))
    codes, timed_out, texts = _request(preload, script, args[1:], [dict(os.environ if env is None else env)],
                                       os.path.abspath(cwd or os.getcwd()), 1e9 if timeout is None else timeout,
                                       separate=True)
    (out, err), = texts
    if timed_out:
        raise subprocess.TimeoutExpired([sys.executable, *args], timeout, output=out, stderr=err)
    return subprocess.CompletedProcess([sys.executable, *args], codes[0], out, err)


def _run_plain(script, argv, envs, timeout) -> list:
    procs = [subprocess.Popen([sys.executable, script, *argv], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for env in envs]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


# ------------------------------------------------------------------ server


def _reseed() -> None:
    """Fresh random states, as a new process has (forked children would all share the server's)."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _startup_settings() -> None:
    """What a new interpreter and torch take from the environment at start-up (the server started
    without them): PYTHONWARNINGS and the intra-op thread count of OMP_NUM_THREADS."""
    import warnings

    options = [o for o in os.environ.get("PYTHONWARNINGS", "").split(",") if o]
    if options:
        sys.warnoptions[:] = options
        warnings._processoptions(options)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _child(request: dict, rank: int) -> None:
    """In the forked child: become `python script argv` with this rank's environment."""
    code = 1
    try:
        out, err = request["outputs"][rank]
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.close(fd)
        if err is None:
            os.dup2(1, 2)
        else:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(request["envs"][rank])
        _startup_settings()
        _reseed()
        os.chdir(request["cwd"])
        script = request["script"]
        sys.argv = [script, *request["argv"]]
        sys.path[0] = os.path.dirname(script)  # as `python script` sets it
        import runpy

        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        # The interpreter's own ending: wait for non-daemon threads, then the atexit handlers.
        threading._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve_one(request: dict) -> dict:
    import time

    pids = []
    for rank in range(len(request["envs"])):
        pid = os.fork()
        if pid == 0:
            _child(request, rank)
        pids.append(pid)
    codes = [None] * len(pids)
    deadline = time.monotonic() + request["timeout"]
    timed_out = False
    cpu = 0.0
    while any(c is None for c in codes):
        for i, pid in enumerate(pids):
            if codes[i] is None:
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done:
                    codes[i] = os.waitstatus_to_exitcode(status)
                    cpu += usage.ru_utime + usage.ru_stime
        if any(c is None for c in codes):
            if time.monotonic() > deadline:
                timed_out = True
                for i, pid in enumerate(pids):
                    if codes[i] is None:
                        os.kill(pid, signal.SIGKILL)
                        codes[i] = os.waitstatus_to_exitcode(os.wait4(pid, 0)[1])
                break
            time.sleep(0.02)
    return {"codes": codes, "timed_out": timed_out, "cpu_s": cpu}


def _serve(preload: str) -> None:
    import importlib
    import warnings

    quiet = ("ignore", None, Warning, None, 0)  # the imports' warnings are for the children to give
    warnings.filters.insert(0, quiet)
    for name in PRELOADS[preload]:
        try:
            importlib.import_module(name)
        except Exception:  # megatron-core absent (its tests skip) or a part of it unusable here: the child
            pass  # imports it itself, as a new process would
    warnings.filters.remove(quiet)  # the filters the imports themselves added stay, as in a new process
    warnings._filters_mutated()
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    while True:
        request = _receive(requests)
        if request is None:  # the pytest process is gone
            return
        _send(replies, _serve_one(request))


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else "megatron")
