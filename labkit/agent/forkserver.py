"""A warm launcher: one long-lived helper with the launcher already imported; each launch is a fork.

Starting ``python3 -m labkit.agent.launch`` costs tens of milliseconds of interpreter start-up and
imports before the first syscall; the container's own set-up takes about ten. So the agent starts
this server once (lazily), and asks it over a Unix socket in /run/labkit to fork a launcher: the
request carries the launcher's arguments and, as SCM_RIGHTS, the child's stdin, stdout and stderr;
the answer is the child's PID, then, when it ends, its exit status. The server is single-threaded
(a selector over the socket, a SIGCHLD wake-up pipe and whatever else is registered), so forking it is
safe. Each agent has its own, which dies with it; the containers' supervisor
(:mod:`labkit.agent.supervisor`) is the same server with more duties. Standard library only.
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


class Server:
    """The fork server's loop. ``duties`` (the supervisor's) may take requests other than a launch (``op``),
    vet a launch (``watch``), learn of each child reaped, register more file descriptors (a callable as the
    selector key's data, called with the event mask), and say when the server may end (``idle``)."""

    def __init__(self, path, duties=None, idle=None):
        self.path, self.duties, self.idle = path, duties, idle
        self.sel = selectors.DefaultSelector()
        self.waiting = {}  # pid -> connection to answer when it ends

    def bye(self, *_):
        try:
            os.unlink(self.path)
        finally:
            os._exit(0)

    def serve(self):
        import gc
        import time
        from . import kernel, launch
        self.modules = (kernel, launch)  # imported once, before any fork: that is the point
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        self.srv.bind(self.path)
        os.umask(old)
        self.srv.listen(64)
        signal.signal(signal.SIGTERM, self.bye)
        self.rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        self.sel.register(self.srv, selectors.EVENT_READ, "accept")
        self.sel.register(self.rfd, selectors.EVENT_READ, "child")
        gc.collect()
        gc.freeze()  # what was imported stays out of the collector's way: a fork then copies fewer pages
        print("ready", flush=True)
        if self.duties is not None:
            self.duties.ready()
        busy = time.monotonic()
        while True:
            events = self.sel.select(timeout=min(self.idle / 3, 10) if self.idle else None)
            if events:
                busy = time.monotonic()
            elif self.idle and not self.waiting and self.duties.idle() and time.monotonic() - busy > self.idle \
                    and self.duties.may_exit():
                self.bye()
            for key, mask in events:
                try:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "child":
                        self._reap()
                    elif self._registered(key.fileobj):
                        key.data(mask)
                except Exception:  # noqa: BLE001 - one bad event must not end the server (and what it holds)
                    import traceback
                    traceback.print_exc()  # (the supervisor's stderr is its log)

    def _registered(self, fileobj):
        try:
            self.sel.get_key(fileobj)
            return True
        except (KeyError, ValueError):
            return False  # unregistered by an earlier event of this round

    def _accept(self):
        try:
            conn, _ = self.srv.accept()
        except OSError:  # EMFILE and the like: the client waits in the backlog for the next round
            import time
            time.sleep(0.05)
            return
        conn.settimeout(5)  # a client that connects and says nothing does not hold the loop
        try:
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 64)
        except OSError:
            conn.close()
            return
        conn.settimeout(None)
        for fd in fds:  # (SCM_RIGHTS gives them without close-on-exec: no program this server starts gets them)
            os.set_inheritable(fd, False)
        try:
            req = json.loads(msg)
            if not isinstance(req, dict):
                raise ValueError("not an object")
            if req.get("op") is not None and self.duties is not None:
                return self.duties.request(req, conn, fds)
            argv = req["argv"]
            extra = self.duties.vet(req, fds) if self.duties is not None else None
            if not isinstance(argv, list) or len(fds) != 3 + len(extra or ()) or \
                    (req.get("watch") is not None and extra is None):
                raise ValueError("a request this server does not take")
        except (ValueError, KeyError, TypeError):
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        try:
            pid = self.launch(argv, fds[:3], req.get("watch"))
        except OSError as exc:  # fork failed (EAGAIN, ENOMEM): the client hears why, nothing is left open
            if self.duties is not None:
                self.duties.launch_failed()
            for fd in fds[3:]:
                os.close(fd)
            _tell(conn, {"error": f"fork: {exc}"})
            conn.close()
            return
        self.waiting[pid] = conn
        if self.duties is not None and req.get("watch") is not None:
            self.duties.launched(pid, req, fds[3:])
        _tell(conn, {"pid": pid})

    def launch(self, argv, fds, watch=None):
        """Fork a launcher with ``argv``; ``fds`` become its 0, 1, 2 (the supervisor may put a terminal there)."""
        import gc
        from . import kernel, launch
        if self.duties is not None and watch is not None:
            fds = self.duties.stdio(watch, fds)
        try:
            pid = os.fork()
        except OSError:
            for fd in set(fds):
                os.close(fd)
            raise
        if pid == 0:
            code = 125
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                gc.disable()  # a launcher lives for milliseconds: no collections
                keep = set(fds)
                for key in list(self.sel.get_map().values()):
                    if key.fd not in keep:
                        os.close(key.fd)
                self.sel = None
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                kernel.libc().prctl(PR_SET_PDEATHSIG, 0)
                if self.duties is not None:
                    self.duties.in_child()
                for i, fd in enumerate(fds):
                    os.dup2(fd, i)
                for fd in set(fds):
                    if fd > 2:
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
        for fd in set(fds):
            os.close(fd)
        return pid

    def _reap(self):
        try:
            os.read(self.rfd, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = self.waiting.pop(pid, None)
            if self.duties is not None:  # a launcher's container adopted, or a container's end
                self.duties.reaped(pid, status, launcher=conn is not None)
            if conn is not None:
                _tell(conn, {"exit": os.waitstatus_to_exitcode(status)})
                conn.close()


def _tell(conn, obj):
    """One line to a client that may have gone (a daemon killed mid-start): never an error here."""
    try:
        conn.settimeout(5)
        conn.sendall((json.dumps(obj) + "\n").encode())
    except OSError:
        pass


def serve(path):
    """Each agent's own fork server: it dies with the agent that started it."""
    from . import kernel
    kernel.libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    Server(path).serve()


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
#: {"supervisor": True} in labkit's daemon: its launchers are forked by the containers' supervisor (which runs
#: anyway), so the daemon keeps no fork server of its own (one Python process less, some 10 MiB)
SHARED = {"supervisor": False}


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
    if SHARED["supervisor"]:
        from . import supervisor
        return supervisor.spawn(argv, stdin, stdout, stderr)
    path = _ensure()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    return _request(conn, {"argv": argv}, [stdin, stdout, stderr])


def _request(conn, req, fds):
    socket.send_fds(conn, [json.dumps(req).encode()], fds)
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            raise MechanismError("the launcher server closed the connection")
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    answer = json.loads(line)
    if "pid" not in answer:
        raise MechanismError(f"the launcher server could not start it: {answer.get('error', answer)}",
                             fix="the machine is short of processes or memory: see `labkit doctor`")
    child = Child(conn, answer["pid"])
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
