"""The containers' supervisor: one process that is the parent of every running container on the machine.

Docker keeps a containerd-shim per container, podman a conmon; labkit keeps one supervisor for all
(``python3 -m labkit.agent.supervisor``, /run/labkit/supervisor-<code version>.sock). It is the fork server
(:class:`labkit.agent.forkserver.Server`) with these duties:

- **parent**: it is a child subreaper (PR_SET_CHILD_SUBREAPER). It forks a container's launcher, the launcher
  leaves as soon as the program runs, and the container's PID 1 becomes the supervisor's child. So an idle
  container costs its own processes and no labkit process of its own.
- **reaper**: it reaps each container, writes its exit status (``exit.json``: the code, or the signal)
  and disconnects its network, once, whoever started it (a daemon, a CLI, a notebook).
- **terminal**: for ``docker run -t`` it holds the pseudo-terminal's master (the container's stdio is the
  slave, its controlling terminal), copies what the container writes to its log and to attached clients,
  and what they type to the container; ``-i`` without ``-t``: it holds the write end of the container's
  stdin. ``attach`` hands it a client's connection (SCM_RIGHTS), ``resize`` sets the window size.
- **alone and short-lived**: it leaves its starter at once (a killed daemon does not take it or its
  containers along), one runs at a time (a lock; /proc/locks names its holder), and it ends by itself
  after :data:`IDLE_SECONDS` without a container or a request.

Standard library only.
"""
import fcntl
import json
import os
import re
import select
import selectors
import signal
import socket
import subprocess
import sys
import time

from ..wire.errors import MechanismError
from ..wire.specs import RUN_DIR, NetworkSpec
from ..wire.words import Detach
from . import forkserver, kernel
from .runner import close_sealed_python, start_helper

PR_SET_CHILD_SUBREAPER = 36
_PATHS = {}


def code_version():
    """A fingerprint of the agent's code (and the wire's). A supervisor serves the clients of its own code only:
    after labkit is updated, a new one starts beside the old, which keeps its containers until they end and
    then ends too (as an old containerd-shim goes on beside a new dockerd)."""
    if "version" not in _PATHS:
        import hashlib
        import pkgutil
        h = hashlib.sha256()
        for pkg in ("labkit.agent", "labkit.wire"):
            mod = __import__(pkg, fromlist=["_"])
            for info in sorted(pkgutil.iter_modules(mod.__path__), key=lambda i: i.name):
                h.update(info.name.encode() + b"\0" + (pkgutil.get_data(pkg, info.name + ".py") or b""))
        _PATHS["version"] = h.hexdigest()[:12]
    return _PATHS["version"]


def identity():
    """Which supervisor serves this process: the one of this code, in this mount namespace. (A container's root
    is mounted where its client runs; a launcher forked by a supervisor in another mount namespace, one a test
    or a tool made with `unshare -m`, would find an empty directory there.)"""
    return f"{code_version()}-{os.stat('/proc/self/ns/mnt').st_ino}"


def paths(ident=None):
    """The socket, the lock (held by the supervisor for its life) and the use lock (shared by clients while they
    ask, exclusive for the supervisor's idle exit) of the supervisor ``ident`` (this process's: :func:`identity`)."""
    if ident is not None and not re.fullmatch(r"[0-9a-f]{12}-[0-9]{1,20}", str(ident)):
        raise MechanismError(f"{ident!r} does not name a supervisor", fix="labkit cleanup")
    base = f"{RUN_DIR}/supervisor-{ident or identity()}"
    return {"socket": base + ".sock", "lock": base + ".lock", "use": base + ".use"}
RUNTIME = RUN_DIR + "/containers"
IDLE_SECONDS = 30.0
OUT_LIMIT = 8 << 20   # output waiting for one slow attached client before it is dropped
IN_LIMIT = 256 << 10  # input waiting for the container before its clients are read no more (back-pressure)
MAX_CLIENTS = 32      # clients attached to one container at a time


def _watch_ok(watch):
    """What a request may ask for when a container ends: its own two files, its own network membership, a
    terminal or stdin. Anything else is refused (the request comes from root, and is checked all the same)."""
    if not isinstance(watch, dict) or not re.fullmatch(r"[0-9a-f]{12}", str(watch.get("owner", ""))):
        return None
    rt = f"{RUNTIME}/{watch['owner']}"
    if watch.get("start") != f"{rt}/start.json" or watch.get("exit") != f"{rt}/exit.json":
        return None
    if not all(isinstance(watch.get(k, False), bool) for k in ("tty", "stdin", "stdin_once")):
        return None
    if watch.get("network") is not None:
        try:
            NetworkSpec(name=watch["network"])
        except Exception:  # noqa: BLE001 - any bad name
            return None
    return watch


def _attach_specs(specs, n):
    """Each attached client: stdin and stdout (bools), and ``detach``: its detach keys in hex ("" for none: the
    client watches for them itself, or has no stdin)."""
    if not isinstance(specs, list) or len(specs) != n or not all(
            isinstance(a, dict) and isinstance(a.get("stdin"), bool) and isinstance(a.get("stdout"), bool) and
            isinstance(a.get("detach", ""), str) and re.fullmatch(r"(?:[0-9a-f]{2}){0,16}", a.get("detach", ""))
            for a in specs):
        return None
    return specs


def _attach_spec(stdin, stdout, detach=None):
    return {"stdin": bool(stdin), "stdout": bool(stdout), "detach": bytes(detach or b"").hex()}


def _socket(fd):
    """A stream socket object for ``fd`` handed over by a client, or None (the fd closed) when it is not one."""
    import stat
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            s = socket.socket(fileno=fd)
            if s.type == socket.SOCK_STREAM:
                return s
            s.detach()
    except OSError:
        pass
    os.close(fd)
    return None


def _hung_up(conn):
    """True when the peer closed its end altogether (POLLHUP), not only its writing half (POLLRDHUP alone)."""
    p = select.poll()
    p.register(conn, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))


def _nonblocking(fd):
    os.set_blocking(fd, False)
    return fd


class _Stdio:
    """One container's terminal (``master``) or stdin pipe (``stdin_w``), and the clients attached to it."""

    def __init__(self, duties, owner, tty, master=None, stdin_w=None, log=None, stdin_once=False):
        self.duties, self.owner, self.tty, self.stdin_once = duties, owner, tty, stdin_once
        self.master, self.stdin_w, self.log = master, stdin_w, log
        self.conns = {}        # socket -> {"in", "out", "buf", "eof"}
        self.inbuf = bytearray()
        self.ended = False     # the container was reaped
        self.closed = False    # the terminal said all it had
        self.console = None    # (-t) the socket on which the container's launcher sends the terminal's master
        self.size = None       # a window size asked for before the master came
        self.had_input = False

    @property
    def sink(self):
        return self.master if self.tty else self.stdin_w

    def add(self, conn, stdin, stdout, detach=""):
        """A client's connection. Its socket stays as it is (blocking): the daemon shares the very same open
        file, so O_NONBLOCK set here would be set there too; this side reads and writes with MSG_DONTWAIT.
        ``detach`` (hex): keys that, typed to a terminal, end this client's attachment (Docker's detach)."""
        if len(self.conns) >= MAX_CLIENTS:
            conn.close()
            return
        self.conns[conn] = {"in": stdin, "out": stdout and self.tty, "buf": bytearray(), "eof": not stdin,
                            "detach": Detach(bytes.fromhex(detach)) if detach and stdin and self.tty else None}
        self.had_input = self.had_input or stdin
        self.update()

    def on_console(self, mask):
        """The master of the terminal the container made for itself (or the launcher's end: it failed)."""
        master = kernel.receive_console(self.console, timeout=1)
        self.duties.want(self.console, 0, None)
        self.console.close()
        self.console = None
        if master is None:
            return self.close()
        self.master = _nonblocking(master)
        if self.size:
            kernel.set_winsize(self.master, *self.size)
        self.update()

    def update(self):
        want = {}
        if self.console is not None:
            want[self.console] = (selectors.EVENT_READ, self.on_console)
        if self.master is not None:
            want[self.master] = (selectors.EVENT_READ | (selectors.EVENT_WRITE if self.inbuf else 0), self.on_master)
        elif self.stdin_w is not None and self.inbuf:
            want[self.stdin_w] = (selectors.EVENT_WRITE, self.on_stdin)
        if self.stdin_w is not None and not self.inbuf and self._inputs_done():
            self._close_stdin()
        for conn, c in self.conns.items():
            mask = (selectors.EVENT_READ if not c["eof"] and len(self.inbuf) < IN_LIMIT and self.sink is not None
                    else 0) | (selectors.EVENT_WRITE if c["buf"] else 0)
            want[conn] = (mask, lambda m, conn=conn: self.on_conn(conn, m))
        for fileobj, (mask, cb) in want.items():
            self.duties.want(fileobj, mask, cb)
        if self.stdin_w is not None and not self.inbuf:
            self.duties.want(self.stdin_w, 0, None)

    def _inputs_done(self):
        """The container has ended, or (Docker's StdinOnce) every client that gave input has ended it: the
        container's stdin gets its EOF. Without StdinOnce it stays open for the next client."""
        return self.ended or (self.stdin_once and self.had_input and
                              not any(c["in"] and not c["eof"] for c in self.conns.values()))

    def on_master(self, mask):
        if mask & selectors.EVENT_WRITE and self.inbuf:
            self._write_input(self.master)
        if mask & selectors.EVENT_READ:
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                data = None
            except OSError:  # EIO: every slave is closed, the container has ended
                data = b""
            if data == b"":
                return self.close()
            if data:
                if self.log is not None:
                    try:
                        os.write(self.log, data)
                    except OSError:
                        pass
                for conn, c in list(self.conns.items()):
                    if c["out"]:
                        c["buf"] += data
                        if len(c["buf"]) > OUT_LIMIT:  # a client that does not read: dropped, not waited for
                            self._drop(conn)
        self.update()

    def on_stdin(self, mask):
        self._write_input(self.stdin_w)
        self.update()

    def _write_input(self, fd):
        try:
            n = os.write(fd, self.inbuf[:65536])
            del self.inbuf[:n]
        except BlockingIOError:
            pass
        except OSError:  # the container closed its stdin: what is left has nowhere to go
            self.inbuf.clear()
            if fd == self.stdin_w:
                self._close_stdin()

    def on_conn(self, conn, mask):
        c = self.conns.get(conn)
        if c is None:
            return
        if mask & selectors.EVENT_READ:
            try:
                data = conn.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                c["eof"] = True
                if not c["out"] or not self.tty or _hung_up(conn):
                    # (a client that only ended its input still reads; one that closed altogether, as a
                    # detached `labkit run -it` does, is dropped now, not at the next output)
                    return self._drop(conn)
            elif data and c["in"] and self.sink is not None:
                detached = False
                if c["detach"] is not None:
                    data, detached = c["detach"].feed(data)
                self.inbuf += data
                if detached:  # the container goes on; this client is done (what it typed before goes in)
                    return self._drop(conn)
        if mask & selectors.EVENT_WRITE and c["buf"]:
            try:
                n = conn.send(c["buf"][:1 << 20], socket.MSG_DONTWAIT)
                del c["buf"][:n]
            except BlockingIOError:
                pass
            except OSError:
                return self._drop(conn)
        if self.master is None and not c["buf"] and c.get("closing"):
            return self._drop(conn)
        self.update()

    def _drop(self, conn):
        self.conns.pop(conn, None)
        self.duties.want(conn, 0, None)
        conn.close()
        if not self._finish_if_done():
            self.update()

    def _finish_if_done(self):
        """Once the terminal (or stdin) is closed and every client has had the last of it: forget this one."""
        if self.master is not None or self.stdin_w is not None or self.console is not None or self.conns or \
                not (self.ended or self.closed):
            return False
        if self.log is not None:
            os.close(self.log)
            self.log = None
        if self.duties.stdios.get(self.owner) is self:
            del self.duties.stdios[self.owner]
        return True

    def _close_stdin(self):
        if self.stdin_w is not None:
            self.duties.want(self.stdin_w, 0, None)
            os.close(self.stdin_w)
            self.stdin_w = None

    def container_ended(self):
        self.ended = True
        if not self.tty:  # its output went to the log, which the daemon sends: only input was ours
            for conn in list(self.conns):
                self._drop(conn)
            self._close_stdin()
            self.close()
        else:
            self.update()

    def close(self):
        """The terminal has nothing more to say: send what is queued, then hang up on every client."""
        self.closed = True
        if self.master is not None:
            self.duties.want(self.master, 0, None)
            os.close(self.master)
            self.master = None
        self._close_stdin()
        for conn, c in list(self.conns.items()):
            if c["buf"]:
                c["closing"] = True
                c["eof"] = True
            else:
                self._drop(conn)
        if not self._finish_if_done():
            self.update()

    def fds(self):
        return [fd for fd in (self.master, self.stdin_w, self.log) if fd is not None] + \
            [c.fileno() for c in self.conns] + ([self.console.fileno()] if self.console is not None else [])


class Duties:
    """The supervisor's books and duties, called by :class:`~labkit.agent.forkserver.Server`."""

    def __init__(self):
        self.server = None
        self.adopt = {}    # launcher pid -> watch
        self.track = {}    # container pid -> watch
        self.early = {}    # pid -> (wait status, monotonic time): reaped before it was known whose it was
        self.stdios = {}   # owner -> _Stdio
        self.helpers = {}  # pid -> Popen of a helper started here (an auto-removal)
        self._next = None  # the terminal or stdin of the launch being made
        self._forked = 0.0

    def ready(self):
        """The starter has its answer: nothing of its pipe or terminal stays here; errors go to a log."""
        fd = os.open(RUN_DIR + "/supervisor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(null)
        os.close(fd)

    def idle(self):
        return not (self.adopt or self.track or self.stdios or self.helpers)

    def may_exit(self):
        """The idle exit, only while no client is between connecting and being answered (they hold USE shared):
        taken exclusively and kept to the end, so a request is never left in the backlog of a server that goes."""
        self._exiting = _lock(self.paths["use"])
        return self._exiting is not None

    def launch_failed(self):
        io, self._next = self._next, None
        if io is not None:
            if io.console is not None:
                io.console.close()
                io.console = None
            for fd in io.fds():
                os.close(fd)

    def want(self, fileobj, mask, callback):
        sel = self.server.sel
        try:
            key = sel.get_key(fileobj)
        except (KeyError, ValueError):
            key = None
        if not mask:
            if key is not None:
                sel.unregister(fileobj)
        elif key is None:
            sel.register(fileobj, mask, callback)
        elif key.events != mask or key.data is not callback:
            sel.modify(fileobj, mask, callback)

    # -- launches -----------------------------------------------------------------------------------------
    def vet(self, req, fds):
        watch = _watch_ok(req.get("watch"))
        if watch is None:
            return None
        specs = _attach_specs(req.get("attach", []), len(fds) - 3)
        if specs is None or (specs and not (watch.get("tty") or watch.get("stdin"))):
            return None
        return specs

    def stdio(self, watch, fds):
        """The launcher's stdin, stdout, stderr: a terminal's slave for ``tty``, a pipe's read end as stdin for
        ``stdin``; the log (``fds[1]``) then stays here (a terminal's output is copied to it)."""
        self._next = None
        self._forked = time.monotonic()  # an orphan reaped before this moment is not this launch's container
        if watch.get("tty"):
            # the terminal is made inside the container (its own /dev/pts): the launcher's stdin is a socket on
            # which the master comes back (runc's console socket); its output goes to the log until then
            ours, theirs = socket.socketpair()
            log = os.dup(fds[1])
            os.set_inheritable(log, False)
            os.close(fds[0])
            self._next = _Stdio(self, watch["owner"], True, log=log, stdin_once=watch.get("stdin_once", False))
            self._next.console = ours
            return [theirs.detach(), fds[1], fds[2]]
        if watch.get("stdin"):
            r, w = os.pipe()
            os.close(fds[0])
            self._next = _Stdio(self, watch["owner"], False, stdin_w=_nonblocking(w),
                                stdin_once=watch.get("stdin_once", False))
            return [r, fds[1], fds[2]]
        return fds

    def launched(self, pid, req, conn_fds):
        self.adopt[pid] = dict(req["watch"], _forked=self._forked)
        io, self._next = self._next, None
        if io is not None:
            old = self.stdios.pop(io.owner, None)
            if old is not None:
                old.close()
            self.stdios[io.owner] = io
            for fd, a in zip(conn_fds, req.get("attach") or []):
                conn = _socket(fd)
                if conn is not None:
                    io.add(conn, a["stdin"], a["stdout"], a.get("detach", ""))
            io.update()
        else:
            for fd in conn_fds:
                os.close(fd)

    def in_child(self):
        """In a freshly forked launcher: none of the supervisor's duties (or file descriptors) go with it."""
        kernel.libc().prctl(PR_SET_CHILD_SUBREAPER, 0)
        for io in list(self.stdios.values()) + ([self._next] if self._next is not None else []):
            for fd in io.fds():
                try:
                    os.close(fd)
                except OSError:
                    pass

    # -- reaping ------------------------------------------------------------------------------------------
    def reaped(self, pid, status, launcher=False):
        helper = self.helpers.pop(pid, None)
        if helper is not None:  # (its Popen must not wait for a pid that may be reused by then)
            helper.returncode = os.waitstatus_to_exitcode(status)
            return
        watch = self.adopt.pop(pid, None)
        if watch is not None:
            self._adopt(watch)
        elif pid in self.track:
            self._ended(self.track.pop(pid), status)
        elif not launcher:  # an orphan: perhaps a container whose launcher has not left yet
            now = time.monotonic()
            self.early[pid] = (status, now)
            if len(self.early) > 4096:  # bounded: an orphan's status is wanted for moments, not kept
                for p, (_, t) in sorted(self.early.items(), key=lambda kv: kv[1][1])[:2048]:
                    del self.early[p]
            for p, (_, t) in list(self.early.items()):
                if now - t > 60:
                    del self.early[p]

    def _adopt(self, watch):
        from .state import read_json, write_json
        report = read_json(watch["start"], default=None)
        forked = watch.get("_forked", 0)
        if not isinstance(report, dict) or report.get("error") is not None or not isinstance(report.get("pid"), int):
            # it never ran: 126/127 when its program could not be run (the launcher said so)
            err = report.get("error") if isinstance(report, dict) else None
            details = err.get("details") if isinstance(err, dict) else None
            code = details.get("exit_code") if isinstance(details, dict) else None
            if not isinstance(code, int):
                code = 125
            try:
                write_json(watch["exit"], {"exit_code": code, "finished": time.time()})
            except OSError:
                pass
            io = self.stdios.get(watch["owner"])
            if io is not None:
                io.container_ended()
            return
        pid = report["pid"]
        early = self.early.pop(pid, None)
        if early is not None and early[1] >= forked:  # (reaped after this launch began: this very process)
            self._ended(watch, early[0])
        else:
            self.track[pid] = watch

    def _ended(self, watch, status):
        from .state import write_json
        code = os.waitstatus_to_exitcode(status)
        out = {"exit_code": code if code >= 0 else 128 - code, "finished": time.time()}
        if code < 0:
            try:
                out["signal"] = signal.Signals(-code).name
            except ValueError:  # a real-time signal has no name of its own
                out["signal"] = f"SIG{-code}"
        try:  # the status first: whoever waits for it should not wait for the network's undoing
            write_json(watch["exit"], out)
        except OSError:
            pass  # the container was removed meanwhile
        if watch.get("network"):
            from . import network
            try:  # the container's end is its network membership's end
                network.disconnect(watch["network"], watch["owner"])
            except Exception as exc:  # noqa: BLE001 - reported in the log; cleanup undoes what is left
                print(f"network {watch['network']}: disconnecting {watch['owner']} failed: {exc}", flush=True)
        io = self.stdios.get(watch["owner"])
        if io is not None:
            io.container_ended()
        if os.path.exists(os.path.join(os.path.dirname(watch["exit"]), "auto-remove")):
            # (engine.auto_remove: a detached `run --rm -it`) removed by a process of its own; reaped here
            try:  # (its errors go to this log; its exit is reaped here, its Popen kept until then)
                proc = start_helper("engine", "autoremove", watch["owner"], stdout=None, stderr=None)
                self.helpers[proc.pid] = proc
            except Exception as exc:  # noqa: BLE001 - reported in the log; `labkit rm` is still there
                print(f"container {watch['owner']}: removing it failed: {exc}", flush=True)

    # -- requests other than a launch ---------------------------------------------------------------------
    def request(self, req, conn, fds):
        """``attach`` (one fd: the client's connection) and ``resize``; answers {"ok": true} or {"error"}."""
        answer = {"ok": True}
        try:
            owner = req.get("owner")
            io = self.stdios.get(owner) if isinstance(owner, str) else None
            if req["op"] == "attach" and len(fds) == 1 and io is not None and _attach_specs(
                    [{"stdin": req.get("stdin"), "stdout": req.get("stdout"), "detach": req.get("detach", "")}], 1):
                client = _socket(fds.pop())  # (not ``conn``: that one gets the answer)
                if client is None:
                    raise OSError("what was handed over is not a connection")
                io.add(client, req["stdin"], req["stdout"], req.get("detach", ""))
            elif req["op"] == "resize" and io is not None and io.tty and not fds and \
                    all(isinstance(req.get(k), int) and 0 < req[k] < 10000 for k in ("h", "w")):
                if io.master is not None:
                    kernel.set_winsize(io.master, req["h"], req["w"])
                else:
                    io.size = (req["h"], req["w"])  # the terminal is still being made: set when it comes
            else:
                answer = {"error": "no such container with a terminal or stdin here, or a bad request"}
        except OSError as exc:
            answer = {"error": str(exc)}
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall((json.dumps(answer) + "\n").encode())
        except OSError:
            pass
        conn.close()


# -- the client's side -----------------------------------------------------------------------------------------

def supervise(argv, stdin, stdout, stderr, watch, attach=()):
    """Fork a container's launcher from the supervisor (started here when none runs), which adopts the container
    when the launcher leaves. ``watch`` = {owner (the container id), start, exit (its report files), network,
    tty, stdin}; ``attach`` = [(socket fd, stdin, stdout[, detach keys])]: clients to connect before the program
    runs, so that they miss nothing of it. Returns the launcher's :class:`~labkit.agent.forkserver.Child`."""
    req = {"argv": argv, "watch": watch, "attach": [_attach_spec(*a[1:]) for a in attach]}
    fds = [stdin, stdout, stderr] + [a[0] for a in attach]
    return _with_supervisor(lambda conn: forkserver._request(conn, req, fds))


def spawn(argv, stdin, stdout, stderr):
    """A launcher forked by the supervisor, watched by nobody (a process run to its end: the daemon's fork
    server); returns its :class:`~labkit.agent.forkserver.Child`."""
    return _with_supervisor(lambda conn: forkserver._request(conn, {"argv": argv}, [stdin, stdout, stderr]))


def attach(owner, fd, stdin, stdout, ident=None, detach=None):
    """Hand a client's connection (``fd``) to the supervisor (``ident``: the one that started it) for running
    container ``owner``'s terminal or stdin; ``detach``: keys (bytes) that end it, typed to a terminal."""
    return _ask({"op": "attach", "owner": owner, **_attach_spec(stdin, stdout, detach)}, [fd], ident)


def resize(owner, h, w, ident=None):
    """The window size of container ``owner``'s terminal (rows ``h``, columns ``w``)."""
    return _ask({"op": "resize", "owner": owner, "h": int(h), "w": int(w)}, [], ident)


def _ask(req, fds, ident=None):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(paths(ident)["socket"])
        socket.send_fds(conn, [json.dumps(req).encode()], fds)
        conn.settimeout(10)
        line = conn.makefile("rb").readline()
    except OSError as exc:
        raise MechanismError(f"the containers' supervisor is not there ({exc})",
                             fix="the container runs without one: stop it and start it again") from None
    finally:
        conn.close()
    answer = json.loads(line or b"{}")
    if not answer.get("ok"):
        raise MechanismError(f"the containers' supervisor said: {answer.get('error', 'nothing')}",
                             fix="is the container running, and was it made with -t or -i?")
    return True


def _with_supervisor(send):
    """Connect (starting a supervisor when none answers) and ``send``. Only a failed connect is tried again:
    a request sent is never sent twice. The USE lock, held shared meanwhile, keeps the supervisor from
    ending between the connect and the answer."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    deadline = time.monotonic() + 10
    where = paths()
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        use = os.open(where["use"], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(use, fcntl.LOCK_SH)
            try:
                conn.connect(where["socket"])
            except (FileNotFoundError, ConnectionRefusedError):
                conn.close()  # none runs, or one that has just ended: start one (its lock keeps it to one)
                if time.monotonic() > deadline:
                    raise
            else:
                return send(conn)
        finally:
            os.close(use)
        proc = start_helper("supervisor", "--identity", identity(), stdout=subprocess.PIPE, cwd="/")
        said = proc.stdout.readline().strip()
        proc.stdout.close()
        proc.wait()
        if said not in (b"ready", b"running"):
            raise MechanismError("the containers' supervisor did not start",
                                 fix="run `labkit doctor`; see /run/labkit/supervisor.log") from None
        if said == b"running":
            time.sleep(0.05)  # another starter's supervisor: give it a moment to listen


def _lock(path):
    """``path`` locked exclusively, its descriptor kept open for as long as the lock is wanted (a supervisor's
    lock for its life, its use lock for its exit); None when someone else holds it."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def holders(ident="any"):
    """PIDs of the running supervisors (``ident``'s, or any): the holders of their locks, from /proc/locks by
    each lock file's inode (a PID file could lie; a lock held is a process alive)."""
    import glob
    inodes = set()
    pattern = f"{RUN_DIR}/supervisor-*.lock" if ident == "any" else paths(ident)["lock"]
    for path in glob.glob(pattern):
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        inodes.add((st.st_dev, st.st_ino))
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    pids = []
    for ln in lines:
        parts = ln.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].count(":") == 2:
            major, minor, ino = parts[5].split(":")
            if (os.makedev(int(major, 16), int(minor, 16)), int(ino)) in inodes:
                pids.append(int(parts[4]))
    return sorted(set(pids))


def stop(rec=None):
    """End the supervisor (``labkit cleanup``, after every container is gone): SIGTERM, then SIGKILL after 5 s;
    True when one was running. (Launchers it forked are in sessions of their own; cleanup kills what they made
    by its cgroups and mounts.)"""
    pids = holders()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                if rec is not None:
                    rec.kill(pid, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 5
        while holders() and time.monotonic() < end:
            time.sleep(0.02)
        if not holders():
            break
    import glob
    for lock in glob.glob(f"{RUN_DIR}/supervisor-*.lock"):  # the files of supervisors no longer running
        fd = _lock(lock)
        if fd is None:
            continue
        try:
            for path in (lock, lock[:-len(".lock")] + ".use", lock[:-len(".lock")] + ".sock"):
                if os.path.lexists(path):
                    os.unlink(path)
        finally:
            os.close(fd)
    return bool(pids)


def main(argv=None):
    close_sealed_python()
    argv = sys.argv[1:] if argv is None else argv
    idle = float(argv[argv.index("--idle") + 1]) if "--idle" in argv else IDLE_SECONDS
    where = paths(argv[argv.index("--identity") + 1] if "--identity" in argv else None)
    if os.fork():  # leave the starter at once: its end (a daemon killed) is not ours
        os._exit(0)
    if _lock(where["lock"]) is None:  # (taken here, after the fork: /proc/locks then names this process)
        print("running", flush=True)  # another one serves: the starter connects to it
        return 0
    os.setsid()
    os.umask(0o022)  # its own, not its starter's: the containers' processes start from it
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # terminals, stdins and clients of many containers
    kernel.libc().prctl(PR_SET_CHILD_SUBREAPER, 1)
    duties = Duties()
    duties.paths = where
    duties.server = forkserver.Server(where["socket"], duties, idle=idle)
    duties.server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
