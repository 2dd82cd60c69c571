"""Run repository scripts as `python script.py ...` would, without paying for torch's import each
time: a fork server that imports the heavy third-party libraries once and forks a fresh process
per script.

Most of the suite's bad-input checks run a script that fails in its first second, after about
5 s of CPU spent importing torch, torchvision and Lightning. Here each run is still its own
process, with its own argv, working directory, stdout/stderr, exit status and interpreter exit
(atexit handlers included); only the import of those libraries is shared. Nothing of this
project is imported before the fork, and no tensor operation runs in the server (so no thread
pool exists when it forks).

    run_python(["stage1.py", "--config-file", ...], cwd=REPO, timeout=240) -> CompletedProcess

An environment (`env=`) that differs from the suite's only in variables read when used
(SAFE_ENV: TORCH_HOME) is applied in the forked process; any other difference (RANK,
OMP_NUM_THREADS, ... are read when those libraries are imported) runs a plain subprocess.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SAFE_ENV = {"TORCH_HOME"}
PRELOAD = ("numpy", "PIL.Image", "yaml", "cv2", "scipy.ndimage", "torch", "torchvision",
           "pytorch_lightning", "tqdm")


# --- the server (python tests/zygote.py SOCKET) ------------------------------------------------

def _serve(path: str) -> None:
    import importlib
    import signal

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the per-request children reap themselves
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _handle(conn)  # never returns
        conn.close()


def _handle(conn: socket.socket) -> None:
    """The request's supervisor: forks the script's process, waits for it (killing it after the
    timeout) and answers with its exit status."""
    try:
        request = json.loads(conn.makefile().readline())
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_script(request)  # never returns
        deadline = time.monotonic() + request["timeout"]
        status = None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                status = "timeout"
            else:
                time.sleep(0.02)
        conn.sendall((json.dumps({"returncode": status}) + "\n").encode())
    finally:
        os._exit(0)


def _run_script(request: dict) -> None:
    import atexit as exit_hooks
    import runpy
    import signal
    import traceback

    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setpgid(0, 0)
        os.chdir(request["cwd"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        if request.get("env") is not None:
            os.environ.clear()
            os.environ.update(request["env"])
        script = os.path.abspath(request["argv"][0])
        sys.argv = [request["argv"][0], *request["argv"][1:]]
        sys.path[0] = os.path.dirname(script)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exit_:
            if exit_.code is None:
                code = 0
            elif isinstance(exit_.code, int):
                code = exit_.code
            else:
                print(exit_.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught error
            traceback.print_exc()
            code = 1
        exit_hooks._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# --- the client ----------------------------------------------------------------------------------

_lock = threading.Lock()
_server: dict = {}


def _socket_path() -> str:
    with _lock:
        if "path" not in _server:
            folder = tempfile.mkdtemp(prefix="bana-zygote-")
            path = os.path.join(folder, "s")
            proc = subprocess.Popen([sys.executable, __file__, path], stdout=subprocess.PIPE,
                                    text=True, cwd=folder)
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the test fork server did not start")
            atexit.register(proc.kill)
            _server.update(path=path, proc=proc, folder=folder)
        return _server["path"]


def run_python(argv, cwd, timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
    timeout=timeout)` for argv = [script.py, args...], through the fork server."""
    argv = [str(a) for a in argv]
    changed = {k for k in set(env or {}) | set(os.environ)
               if (env or os.environ).get(k) != os.environ.get(k)} if env is not None else set()
    if changed - SAFE_ENV or not argv or not argv[0].endswith(".py"):
        return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=env)
    with tempfile.TemporaryDirectory(prefix="bana-run-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        request = {"argv": argv, "cwd": os.path.abspath(cwd), "timeout": timeout,
                   "stdout": str(out), "stderr": str(err), "env": env}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(_socket_path())
            conn.sendall((json.dumps(request) + "\n").encode())
            reply = json.loads(conn.makefile().readline())
        stdout = out.read_text(errors="replace") if out.exists() else ""
        stderr = err.read_text(errors="replace") if err.exists() else ""
    if reply["returncode"] == "timeout":
        raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, stdout, stderr)
    return subprocess.CompletedProcess([sys.executable, *argv], reply["returncode"], stdout,
                                       stderr)


if __name__ == "__main__":
    _serve(sys.argv[1])
