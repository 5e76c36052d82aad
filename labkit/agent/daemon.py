"""The daemon: labkit's agent kept running, as dockerd is, on two unix sockets under /run/labkit.

- ``labkitd.sock`` speaks labkit's own protocol (JSON lines, :mod:`labkit.wire.protocol`, the same
  methods as every other transport: :data:`labkit.agent.server.METHODS`); the CLI and
  ``labkit.connect()`` use it when it answers (``unix:///run/labkit/labkitd.sock``).
- ``docker.sock`` speaks Docker's Engine API (:mod:`labkit.agent.dockerapi`), so the real docker CLI and
  SDK drive labkit's engine: ``DOCKER_HOST=unix:///run/labkit/docker.sock docker ps``.

Both sockets are root's alone (0600, in the root-only /run/labkit): whoever may connect is root on this
machine, as with Docker's socket. One process, a thread per connection; requests that change the target
are taken one at a time (one lock), those that only wait or read (``container.wait``, logs, lists) go
beside them. Containers do not depend on the daemon: their parent is the containers' supervisor
(:mod:`labkit.agent.forkserver`, a process of its own), and their state is in files, so a daemon killed even
with SIGKILL leaves them running, reaped and logged, and the next one finds them (Docker's live-restore). The PID file records the daemon's pid with its start time, so a stop never
signals a recycled pid; a lock file keeps a second daemon from starting beside the first.

``python3 -m labkit.agent.daemon`` runs it in the foreground (``labkit daemon run``); :func:`start`
starts it in the background and waits until it answers; :func:`stop` stops it. Standard library only.
"""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from ..wire import protocol
from ..wire.errors import LabkitError, MechanismError, PrivilegeError
from ..wire.specs import DAEMON_SOCKET as SOCKET
from ..wire.specs import DOCKER_SOCKET, RUN_DIR
from .runner import pid_fields, recorded_process
from .state import private_dir, read_json, write_json

PIDFILE = f"{RUN_DIR}/labkitd.json"
LOCK = f"{RUN_DIR}/labkitd.lock"
LOG = f"{RUN_DIR}/labkitd.log"

#: methods that only read or wait: they do not queue behind a change, nor hold one up
CONCURRENT = frozenset({"hello", "container.wait", "container.logs", "container.ps", "container.inspect",
                        "container.top", "image.list", "image.inspect", "net.list", "net.inspect", "net.topology",
                        "proc.list", "proc.inspect", "cgroup.stats", "cgroup.sample", "cgroup.list", "read_file",
                        "list_dir", "vm.list", "registry.get", "registry.status", "volume.ls",
                        "volume.inspect",
                        # long transfers and builds: the store's own lock (store.locked) keeps them apart from prune
                        # and from each other where they meet, so they do not stop every other request meanwhile
                        "image.pull", "image.push", "image.build", "image.search"})


def status():
    """{'pid', 'socket', 'docker_socket', 'started'} of the daemon that runs, or None."""
    entry = read_json(PIDFILE, default=None)
    if not isinstance(entry, dict) or recorded_process(entry) is None:
        return None
    return {"pid": entry["pid"], "socket": SOCKET, "docker_socket": DOCKER_SOCKET, "started": entry.get("started")}


def answers(path=SOCKET, timeout=2.0):
    """Whether a daemon answers its hello on ``path`` (a cheap check the client makes before using it)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            line = s.makefile("rb").readline(protocol.MAX_LINE)
        return json.loads(line).get("hello") == protocol.HELLO
    except (OSError, ValueError, AttributeError):
        return False


# -- the daemon process ------------------------------------------------------------------------------------
class _Daemon:
    def __init__(self):
        self.lock = threading.Lock()  # one change to the target at a time
        self.stopping = threading.Event()
        self.listeners = []

    def handle(self, request):
        from .server import handle
        method = request.get("method") if isinstance(request, dict) else None
        if method in CONCURRENT:
            return handle(request)
        with self.lock:
            return handle(request)

    def serve_protocol(self, conn):
        """One client of labkitd.sock: the protocol's lines until it hangs up."""
        from .server import _hello, encode_answer, read_request
        with conn:
            infile, outfile = conn.makefile("rb"), conn.makefile("wb", buffering=0)
            try:
                outfile.write(encode_answer(_hello()))
                while not self.stopping.is_set():
                    request, answer = read_request(infile)
                    if request is None and answer is None:
                        return
                    outfile.write(encode_answer(answer if answer is not None else self.handle(request)))
            except OSError:  # the client went away mid-answer
                return

    def listen(self, path):
        """A root-only unix socket at ``path`` (a stale one, left by a daemon that was killed, is replaced:
        the lock file says no daemon owns it)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(64)
        self.listeners.append((s, path))
        return s

    #: connections served at once (each a thread); more wait in the listen backlog
    MAX_CONNECTIONS = 256

    def accept_loop(self, sock, serve_one):
        """Accept until the daemon stops. Running out of file descriptors or threads only slows it down
        (it waits and tries again): it never stops accepting while the daemon runs."""
        slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)

        def serve(conn):
            try:
                serve_one(conn)
            finally:
                slots.release()
        while not self.stopping.is_set():
            slots.acquire()
            try:
                conn, _ = sock.accept()
            except OSError:
                slots.release()
                if self.stopping.is_set():
                    return  # closed: the daemon stops
                time.sleep(0.1)  # EMFILE, ENFILE, ECONNABORTED...: try again
                continue
            try:
                threading.Thread(target=serve, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread to be had: this client is refused, the next one may not be
                conn.close()
                slots.release()
                time.sleep(0.1)

    def close(self):
        self.stopping.set()
        for s, path in self.listeners:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def run(docker_api=True):
    """Be the daemon, in this process, until SIGTERM or SIGINT (``labkit daemon run``). Returns 0."""
    from .server import _precheck
    _precheck()
    private_dir(RUN_DIR)
    lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            running = status()
            raise MechanismError(f"labkit's daemon already runs (pid {running['pid'] if running else '?'})",
                                 fix="stop it first: labkit daemon stop") from None
        raise
    os.umask(0o022)
    daemon = _Daemon()
    done = threading.Event()

    def on_signal(signum, frame):
        done.set()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        threads = [threading.Thread(target=daemon.accept_loop, args=(daemon.listen(SOCKET), daemon.serve_protocol),
                                    daemon=True)]
        if docker_api:
            from . import dockerapi
            api = dockerapi.EngineAPI(daemon)
            threads.append(threading.Thread(target=daemon.accept_loop,
                                            args=(daemon.listen(DOCKER_SOCKET), api.serve_connection), daemon=True))
        from . import forkserver
        forkserver.SHARED["supervisor"] = True  # launchers come from the containers' supervisor: no server of its own
        write_json(PIDFILE, {**pid_fields(os.getpid()), "started": time.time(), "docker_api": docker_api})
        for t in threads:
            t.start()
        print(f"labkit daemon {os.getpid()}: {SOCKET}" + (f", Docker's Engine API on {DOCKER_SOCKET}" if docker_api
                                                          else ""), flush=True)
        while not done.wait(3600):
            pass
        return 0
    finally:
        daemon.close()
        # a change in progress (a create, a start, a pull) finishes before the process ends: nothing half-made
        if daemon.lock.acquire(timeout=60):
            daemon.lock.release()
        for s, h in old.items():
            signal.signal(s, h)
        entry = read_json(PIDFILE, default=None)
        if isinstance(entry, dict) and entry.get("pid") == os.getpid():
            os.unlink(PIDFILE)
        os.close(lock_fd)


def start(timeout=15.0, docker_api=True):
    """Start the daemon in the background (its own session; output to /run/labkit/labkitd.log) and wait until
    it answers. Returns its status; when one already runs, that one's."""
    running = status()
    if running and answers():
        return running
    if os.geteuid() != 0:
        raise PrivilegeError("labkit's daemon runs as root", fix="run `sudo labkit daemon start`")
    private_dir(RUN_DIR)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=pkg_root + (os.pathsep + os.environ["PYTHONPATH"]
                                                   if os.environ.get("PYTHONPATH") else ""))
    argv = [sys.executable, "-m", "labkit.agent.daemon"] + ([] if docker_api else ["--no-docker-api"])
    fd = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd="/", env=env,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise MechanismError(f"labkit's daemon exited at once (code {proc.returncode})",
                                 fix=f"read its log: {LOG}")
        if answers(timeout=0.5):
            return status()
        time.sleep(0.02)
    raise MechanismError(f"labkit's daemon did not answer within {timeout:g} s", fix=f"read its log: {LOG}")


def stop(timeout=10.0):
    """Stop the daemon (SIGTERM, then SIGKILL after ``timeout``); its containers go on running. Returns the pid
    it stopped, or None when none ran. Only the very process the PID file names is signalled."""
    entry = read_json(PIDFILE, default=None)
    pid = recorded_process(entry) if isinstance(entry, dict) else None
    if pid is None:
        _remove_stale()
        return None
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end and recorded_process(entry) is not None:
        time.sleep(0.02)
    if recorded_process(entry) is not None:
        os.kill(pid, signal.SIGKILL)
        while recorded_process(entry) is not None:
            time.sleep(0.02)
    _remove_stale()
    return pid


def _remove_stale():
    """What a daemon killed with SIGKILL left: its sockets and PID file (only when no daemon holds the lock)."""
    try:
        fd = os.open(LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a daemon runs
        for path in (SOCKET, DOCKER_SOCKET, PIDFILE):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)


# -- the agent's methods (labkit.agent.server.METHODS): a notebook starts and stops the daemon on its target --
def m_start():
    """Start the daemon on this target (the one that runs already, when one does): its status, and whether
    this call started it (so the caller knows whether to stop it)."""
    before = status()
    st = start()
    return dict(st, started_here=before is None)


def m_stop():
    """Stop the daemon on this target; refused from inside the daemon itself (the answer could not come back)."""
    running = status()
    if running and running["pid"] == os.getpid():
        raise MechanismError("this request came through the daemon, which cannot stop itself and answer",
                             fix="stop it from a shell: sudo labkit daemon stop (or connect with LABKIT_DAEMON=off)")
    return {"stopped": stop()}


def m_status():
    st = status()
    return dict(st, answers=answers()) if st else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(docker_api="--no-docker-api" not in argv)
    except LabkitError as exc:
        print(f"labkit daemon: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
