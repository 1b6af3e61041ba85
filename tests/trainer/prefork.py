"""Start the tests' worker processes from a pre-imported parent: the same real processes, without paying the imports each time.

Why: on the AVX2-only machine A a worker process spends 7-10 s of CPU before it does anything (torch 3.1 s,
torch._dynamo 2.7 s, which torch.optim's step imports, tessera, TensorBoard, DeepSpeed and the torch._inductor its
ZeRO set-up imports), and the suite started ~150 of them: ~1,200 s of CPU in all, most of it importing (measured
with a per-process log, session 18); 4 ranks on 2 cores spent ~15-20 s of each launch importing.

How: one server process (this file run as a script) imports those modules once and waits on a Unix socket. For each
request it forks a child, which takes the request's argv, environment, working directory and output file descriptor
and runs the script as `__main__` (runpy, the script's folder first on sys.path), then exits with its exit code: a fresh process with its own pid,
memory and process group, which has imported nothing but what every worker imports, and has run nothing (the server
never runs a tensor operation, starts a thread or a process group). The server sends the child's pid, then its exit
status. `Process` is the client side: enough of subprocess.Popen (pid, poll, wait, kill, communicate) for the tests.
The server stops when the test session's process ends (its atexit, or the server sees its parent gone).

Off with TESSERA_TEST_PREFORK=0 (every launch becomes a plain subprocess.Popen). What the children share with the
server and a fresh interpreter would not: the environment the modules read when imported (the server starts with
OMP_NUM_THREADS=1, DS_ACCELERATOR=cpu, and the test session's TRITON_INTERPRET and CPU kernel variables); Python's
`random` is reseeded in every child (CPython's fork hook), numpy's global generator is not (nothing here uses it unseeded).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.utils.tensorboard",
    "numpy",
    "deepspeed",
    "deepspeed.runtime.engine",
    "deepspeed.runtime.zero.stage_1_and_2",
    "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "tessera.core.root_config",
    "tessera.cluster.engine",
    "tessera.cluster.sharded",
    "tessera.trainer.transformer_train",
    "tessera.trainer.dvae_train",
    "tessera.trainer.clip_train",
)
# what the modules above read when imported; a request whose environment differs in one of these gets a plain process
IMPORT_ENV = ("OMP_NUM_THREADS", "DS_ACCELERATOR", "TRITON_INTERPRET", "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_CBWR")
SERVER_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


# -- the server -------------------------------------------------------------------------------------------------------
def _child(req: dict, out_fd: int) -> None:
    """In the forked child: become the requested process (`python script args...`) and never return."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if req["pgid"] is not None:
            os.setpgid(0, req["pgid"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        script, *args = req["argv"][1:]
        extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[:0] = [os.path.dirname(os.path.abspath(script)), *extra]
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if 0 <= code < 256 else 1)


def serve(path: str) -> None:
    """Import PRELOAD, then fork a child for each request on the Unix socket at `path`, until the socket's file is gone
    or the process that started the server has ended."""
    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the client waits for this name: the server is ready
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    parent = os.getppid()
    while os.path.exists(path) and os.getppid() == parent:  # the test session ended (or died): stop
        for key, _ in sel.select(timeout=0.02):
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 1)
            req = json.loads(msg.decode())
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sel.close()
                listener.close()
                for c in (conn, *children.values()):
                    c.close()
                _child(req, fds[0])
            if req["pgid"] is not None:  # here too (the classic race): the next request may name this child's group
                try:
                    os.setpgid(pid, req["pgid"])
                except OSError:
                    pass  # the child got there first
            os.close(fds[0])
            conn.sendall(f"pid {pid}\n".encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                code = os.waitstatus_to_exitcode(status)
                try:
                    conn.sendall(f"exit {code}\n".encode())
                except OSError:
                    pass
                conn.close()
    for pid in children:  # only when the session died with workers still running
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the client -------------------------------------------------------------------------------------------------------
class Process:
    """A child of the server, seen from the test: pid, poll(), wait(timeout), kill(), returncode, communicate()."""

    def __init__(self, conn: socket.socket, reader: int | None):
        self._conn, self._reader, self.returncode = conn, reader, None
        self._buf = b""
        self.pid = int(self._line().split()[1])

    def _line(self, timeout: float | None = None) -> str:
        self._conn.settimeout(timeout)
        while b"\n" not in self._buf:
            data = self._conn.recv(4096)
            if not data:
                raise RuntimeError("prefork server went away")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = int(self._line(0.0).split()[1])
            except (BlockingIOError, TimeoutError, socket.timeout):
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = int(self._line(timeout).split()[1])
            except (TimeoutError, socket.timeout):
                raise subprocess.TimeoutExpired("prefork child", timeout) from None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """Read the output pipe to its end (every writer gone) and wait; as Popen.communicate with text output."""
        chunks, deadline = [], None if timeout is None else time.time() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self._reader, selectors.EVENT_READ)
        while True:
            left = None if deadline is None else deadline - time.time()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("prefork child", timeout)
            if not sel.select(left):
                continue
            data = os.read(self._reader, 1 << 16)
            if not data:
                break
            chunks.append(data)
        os.close(self._reader)
        self._reader = None
        self.wait(None if deadline is None else max(0.1, deadline - time.time()))
        return b"".join(chunks).decode(errors="replace"), None


_SERVER: dict = {}


def _server_path() -> str | None:
    """The socket of the running server, started on first use; None when prefork is off or the server failed to start."""
    if os.environ.get("TESSERA_TEST_PREFORK", "1") == "0":
        return None
    if "path" in _SERVER:
        return _SERVER["path"]
    d = tempfile.mkdtemp(prefix="tessera-prefork-")
    path = os.path.join(d, "sock")
    env = {**os.environ, **SERVER_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "trainer")])}
    log = open(os.path.join(d, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, __file__, path], env=env, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
    t0 = time.time()
    while not os.path.exists(path) and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    if not os.path.exists(path):
        proc.kill()
        _SERVER["path"] = None
        print(f"prefork: the server did not start (see {log.name}); workers start as plain processes", file=sys.stderr)
        return None
    _SERVER.update(path=path, proc=proc, env={k: env.get(k) for k in IMPORT_ENV})

    def stop() -> None:
        os.unlink(path)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(d, ignore_errors=True)

    atexit.register(stop)
    return path


def _matches(env: dict[str, str]) -> bool:
    """True when a fresh process with `env` would import the preloaded modules as the server did."""
    server = _SERVER["env"]
    return all(env.get(k, server[k] if k in SERVER_ENV else None) == server[k] for k in IMPORT_ENV)


def popen(argv: list[str], env: dict[str, str], cwd: str | Path, stdout=None, process_group: int | None = None):
    """Start `[sys.executable, script.py, *args]` as subprocess.Popen would, stdout and stderr to `stdout` (a file object
    or fd; None: a pipe, read with communicate()): through the server when it runs and the import-time environment
    matches, else as a plain subprocess.Popen (text mode)."""
    path = _server_path()
    if path is None or argv[0] != sys.executable or not str(argv[1]).endswith(".py") or not _matches(env):
        pipe = subprocess.PIPE if stdout is None else stdout
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=pipe, stderr=subprocess.STDOUT, text=True, process_group=process_group)
    reader = None
    if stdout is None:
        reader, fd = os.pipe()
    else:
        fd = stdout if isinstance(stdout, int) else stdout.fileno()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    req = {"argv": [str(a) for a in argv], "env": dict(env), "cwd": str(cwd), "pgid": process_group}
    socket.send_fds(conn, [json.dumps(req).encode()], [fd])
    if reader is not None:
        os.close(fd)
    return Process(conn, reader)


if __name__ == "__main__":
    serve(sys.argv[1])
    os._exit(0)  # nothing to tear down: skip the interpreter's (seconds, with torch and DeepSpeed loaded)
