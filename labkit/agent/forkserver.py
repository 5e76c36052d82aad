"""A warm launcher: one long-lived helper with the launcher already imported; each launch is a fork.

Starting ``python3 -m labkit.agent.launch`` costs tens of milliseconds of interpreter start-up and
imports before the first syscall; the container's own set-up takes about ten. So the agent starts
this server once (lazily), and asks it over a Unix socket in /run/labkit to fork a launcher: the
request carries the launcher's arguments and, as SCM_RIGHTS, the child's stdin, stdout and stderr;
the answer is the child's PID, then, when it ends, its exit status. The server is single-threaded
(a selector over the socket and a SIGCHLD wake-up pipe), so forking it is safe, and it dies with the
agent that started it. Standard library only.
"""
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading

from ..wire.errors import MechanismError
from ..wire.specs import RUN_DIR
from .runner import close_sealed_python, start_helper

PR_SET_PDEATHSIG = 1


def serve(path):
    from . import kernel, launch  # imported once, before any fork: that is the point
    kernel.libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    srv.bind(path)
    os.umask(old)
    srv.listen(64)

    def bye(*_):
        try:
            os.unlink(path)
        finally:
            os._exit(0)
    signal.signal(signal.SIGTERM, bye)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, "accept")
    sel.register(rfd, selectors.EVENT_READ, "child")
    waiting = {}  # pid -> connection to answer when it ends
    import gc
    gc.collect()
    gc.freeze()  # what was imported stays out of the collector's way: a fork then copies fewer pages
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "accept":
                conn, _ = srv.accept()
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                    argv = json.loads(msg)["argv"]
                except (OSError, ValueError, KeyError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    code = 125
                    try:
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        gc.disable()  # a launcher lives for milliseconds: no collections
                        sel.close()
                        srv.close()
                        conn.close()
                        signal.set_wakeup_fd(-1)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        kernel.libc().prctl(PR_SET_PDEATHSIG, 0)
                        for i, fd in enumerate(fds):
                            os.dup2(fd, i)
                            os.close(fd)
                        os.setsid()
                        code = launch.main(argv)
                    except SystemExit as exc:
                        code = exc.code if isinstance(exc.code, int) else 1
                    except BaseException as exc:  # noqa: BLE001 - report and leave, never return into the server
                        try:
                            os.write(2, f"launcher failed: {type(exc).__name__}: {exc}\n".encode())
                        except OSError:
                            pass
                    finally:
                        os._exit(code if isinstance(code, int) else 1)
                for fd in fds:
                    os.close(fd)
                waiting[pid] = conn
                conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
            else:
                try:
                    os.read(rfd, 4096)
                except BlockingIOError:
                    pass
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    conn = waiting.pop(pid, None)
                    if conn is not None:
                        try:
                            conn.sendall((json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n").encode())
                        except OSError:
                            pass
                        conn.close()


class Child:
    """A launcher forked by the server: ``pid``, ``wait(timeout)`` -> exit code."""

    def __init__(self, conn, pid):
        self.conn, self.pid = conn, pid
        self._buf = b""

    def wait(self, timeout=None):
        self.conn.settimeout(timeout)
        try:
            while b"\n" not in self._buf:
                chunk = self.conn.recv(4096)
                if not chunk:
                    raise MechanismError("the launcher's server went away before the launcher ended")
                self._buf += chunk
        except socket.timeout:
            raise TimeoutError from None
        line, self._buf = self._buf.split(b"\n", 1)
        self.conn.close()
        return json.loads(line)["exit"]


_lock = threading.Lock()
_server = {}


def _socket_path():
    return f"{RUN_DIR}/forkserver-{os.getpid()}.sock"


def _ensure():
    with _lock:
        proc = _server.get("proc")
        if proc is not None and proc.poll() is None:
            return _server["path"]
        os.makedirs(RUN_DIR, exist_ok=True)
        path = _socket_path()
        proc = start_helper("forkserver", path, stdout=subprocess.PIPE, cwd="/")
        if proc.stdout.readline().strip() != b"ready":
            proc.kill()
            raise MechanismError("the launcher server did not start")
        _server.update(proc=proc, path=path)
        return path


def spawn(argv, stdin, stdout, stderr):
    """Fork a launcher with ``argv`` and these three file descriptors; returns a :class:`Child`."""
    path = _ensure()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [json.dumps({"argv": argv}).encode()], [stdin, stdout, stderr])
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            raise MechanismError("the launcher server closed the connection")
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    child = Child(conn, json.loads(line)["pid"])
    child._buf = rest
    return child


def stop():
    proc = _server.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    path = _server.pop("path", None)
    if path and os.path.exists(path):
        os.unlink(path)


if __name__ == "__main__":
    close_sealed_python()
    serve(sys.argv[1])
