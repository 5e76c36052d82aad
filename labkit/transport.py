"""Transports: how the client reaches the agent. Same protocol, same agent code, three ways in.

- :class:`InProcess`: the client already is root on Linux (CI, grading servers); requests still go
  through the JSON encoding so that behaviour is identical to the other two.
- :class:`Subprocess` (``sudo``): the agent runs as ``sudo -n python3 agent.pyz`` next to an
  unprivileged notebook on a Linux laptop.
- :class:`SSH`: the agent runs over an SSH exec channel (paramiko) on the lab VM or any Linux host,
  with ``sudo -n`` when the SSH user is not root; the agent is shipped as a zipapp when missing.

``agent_zipapp()`` packs the standard-library-only part of labkit into one file. The client core in
this module is standard library only; paramiko is imported only by the SSH transport.
"""
import hashlib
import io
import itertools
import os
import shlex
import subprocess
import sys
import threading
import zipfile

from . import protocol
from .errors import LabkitError, PrivilegeError, ProtocolError, TransportError, from_wire

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
# The agent's files: the package root modules it imports, and the agent subpackage.
AGENT_FILES = ("__init__.py", "errors.py", "protocol.py", "specs.py")
AGENT_MAIN = "import sys\nfrom labkit.agent.server import main\nsys.exit(main())\n"


def agent_zipapp_bytes():
    """A zipapp (bytes) holding labkit's agent; deterministic, so its hash names its version."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(arc, data):
            info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
        add("__main__.py", AGENT_MAIN)
        for fn in AGENT_FILES:
            with open(os.path.join(PKG_DIR, fn), "rb") as f:
                add(f"labkit/{fn}", f.read())
        agent_dir = os.path.join(PKG_DIR, "agent")
        for fn in sorted(os.listdir(agent_dir)):
            if fn.endswith(".py"):
                with open(os.path.join(agent_dir, fn), "rb") as f:
                    add(f"labkit/agent/{fn}", f.read())
    return buf.getvalue()


def agent_zipapp(cache_dir=None):
    """Write the zipapp into a cache directory (once per content) and return its path."""
    data = agent_zipapp_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "labkit")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"agent-{digest}.pyz")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return path


class Transport:
    """Base: ``call(method, **params)`` sends one request and returns the result or raises."""

    name = "transport"

    def __init__(self):
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.hello = None

    def call(self, method, **params):
        req = {"id": next(self._ids), "method": method, "params": params}
        with self._lock:
            answer = self._roundtrip(req)
        if answer.get("id") != req["id"]:
            raise ProtocolError(f"the agent answered request {answer.get('id')} to request {req['id']}")
        if answer.get("ok"):
            return answer.get("result")
        raise from_wire(answer.get("error") or {})

    def _roundtrip(self, req):
        raise NotImplementedError

    def close(self):
        pass

    def describe(self):
        return self.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InProcess(Transport):
    """The agent's code runs in this process (which must be root on Linux)."""

    name = "in-process"

    def __init__(self):
        super().__init__()
        from .agent import server
        if sys.platform != "linux":
            from .errors import UnsupportedHost
            raise UnsupportedHost(f"the in-process transport needs Linux; this is {sys.platform}")
        if os.geteuid() != 0:
            raise PrivilegeError(f"the in-process transport needs root; this process runs as uid {os.geteuid()}",
                                 fix="use labkit.connect('sudo') (the agent runs under sudo) or run as root")
        self._server = server
        self.hello = protocol.check_hello(protocol.decode(protocol.encode(server._hello())))

    def _roundtrip(self, req):
        answer = self._server.handle(protocol.decode(protocol.encode(req)))
        return protocol.decode(protocol.encode(answer))


class _Stream(Transport):
    """Common code for transports that speak lines over a pair of byte streams."""

    def _start(self, rfile, wfile):
        self._r, self._w = rfile, wfile
        line = self._r.readline()
        if not line:
            raise TransportError(f"the agent ({self.describe()}) exited before saying hello: "
                                 f"{self._stderr_tail() or 'no output'}", fix=self._start_fix())
        self.hello = protocol.check_hello(protocol.decode(line))

    def _start_fix(self):
        return ""

    def _stderr_tail(self):
        return ""

    def _roundtrip(self, req):
        try:
            self._w.write(protocol.encode(req))
            self._w.flush()
            line = self._r.readline()
        except (OSError, ValueError) as exc:
            raise TransportError(f"lost the agent ({self.describe()}): {exc}", fix=self._start_fix()) from None
        if not line:
            raise TransportError(f"the agent ({self.describe()}) closed the connection: {self._stderr_tail()}",
                                 fix="reconnect with labkit.connect(...); " + self._start_fix())
        return protocol.decode(line)


class Subprocess(_Stream):
    """The agent as a child process, e.g. ``sudo -n python3 agent.pyz``."""

    def __init__(self, argv, name="subprocess", fix=""):
        super().__init__()
        self.name, self.argv, self._fix = name, list(argv), fix
        self._errbuf = bytearray()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise TransportError(f"cannot start the agent with {self.argv!r}: {exc.strerror}", fix=fix) from None
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self._start(self.proc.stdout, self.proc.stdin)
        except LabkitError:
            self.close()
            raise

    def _drain(self):
        for chunk in iter(lambda: self.proc.stderr.read1(4096) if hasattr(self.proc.stderr, "read1")
                          else self.proc.stderr.read(4096), b""):
            self._errbuf += chunk
            del self._errbuf[:-8192]

    def _stderr_tail(self):
        self.proc.poll()
        return bytes(self._errbuf).decode("utf-8", "replace").strip()[-600:]

    def _start_fix(self):
        return self._fix

    def describe(self):
        return f"{self.name}: {' '.join(shlex.quote(a) for a in self.argv)}"

    def close(self):
        proc = getattr(self, "proc", None)
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sudo_transport(python="/usr/bin/python3", wrapper=()):
    """The agent under ``sudo -n`` (no password prompt: a notebook cannot answer one)."""
    if sys.platform != "linux":
        from .errors import UnsupportedHost
        raise UnsupportedHost(f"the sudo transport runs the agent on this machine, which is {sys.platform}")
    pyz = agent_zipapp()
    argv = list(wrapper) + ["sudo", "-n", python, pyz]
    fix = ("let this user run the agent without a password: add a sudoers rule such as "
           f"`{os.environ.get('USER', 'student')} ALL=(root) NOPASSWD: {python}` (visudo), or run `sudo -v` "
           "in a terminal first, or use labkit.connect('vagrant')")
    try:
        t = Subprocess(argv, name="sudo", fix=fix)
    except TransportError as exc:
        raise PrivilegeError(f"could not start the agent with sudo: {exc.message}", fix=fix) from None
    return t


def socket_in_netns(netns, host, port, timeout):
    """A TCP connection made from inside the named network namespace /run/netns/<netns>.

    setns(2) moves only the calling thread, so a short-lived thread enters the namespace, connects,
    and ends; the socket stays in that namespace. Used to reach a VM whose network exists only there."""
    from .agent import kernel
    import socket
    out = {}

    def work():
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                kernel.setns(fd, kernel.CLONE_NEWNET)
            finally:
                os.close(fd)
            out["sock"] = socket.create_connection((host, port), timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = exc

    t = threading.Thread(target=work, name=f"connect-in-{netns}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]


class SSH(_Stream):
    """The agent over an SSH exec channel (paramiko)."""

    name = "ssh"

    def __init__(self, host, port=22, user=None, key_filename=None, sudo=None, python="python3",
                 remote_agent=None, remote_checkout=None, connect_timeout=15, known_hosts=None, password=None,
                 netns=None):
        super().__init__()
        try:
            import paramiko
        except ImportError:
            raise TransportError("the SSH transport needs paramiko",
                                 fix="pip install paramiko (it is in labkit's dependencies)") from None
        self.host, self.port, self.user = host, int(port), user
        self.client = paramiko.SSHClient()
        if known_hosts:
            self.client.load_host_keys(known_hosts)
            self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            self.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        fix = (f"check that sshd runs on {host}:{port} and accepts this key for {user}: "
               f"`ssh -p {port} -i {key_filename} {user}@{host} true`")
        try:
            sock = socket_in_netns(netns, host, self.port, connect_timeout) if netns else None
            self.client.connect(host, port=self.port, username=user, key_filename=key_filename, password=password,
                                timeout=connect_timeout, banner_timeout=connect_timeout, sock=sock,
                                auth_timeout=connect_timeout, allow_agent=False, look_for_keys=False)
        except Exception as exc:  # noqa: BLE001 - paramiko and socket errors alike
            raise TransportError(f"cannot connect over SSH to {user}@{host}:{port}"
                                 f"{f' in network namespace {netns}' if netns else ''}: {exc}", fix=fix) from None
        self._fix = fix
        remote_uid = self._exec_simple("id -u").strip()
        if sudo is None:
            sudo = remote_uid != "0"
        if remote_agent is None and remote_checkout and self._has_checkout(remote_checkout):
            # the synced checkout (the lab VM): edits on the host reach the agent with `vagrant rsync`
            agent = f"env PYTHONPATH={shlex.quote(remote_checkout)} {shlex.quote(python)} -m labkit.agent"
        else:
            agent = f"{shlex.quote(python)} {shlex.quote(remote_agent or self._ship_agent(python))}"
        cmd = ("sudo -n " if sudo else "") + agent
        self.command = cmd
        chan = self.client.get_transport().open_session(timeout=connect_timeout)
        chan.exec_command(cmd)
        self.chan = chan
        self._errbuf = bytearray()
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self._start(chan.makefile("rb"), chan.makefile("wb"))
        except LabkitError:
            self.close()
            raise

    def _exec_simple(self, cmd, data=None):
        stdin, stdout, stderr = self.client.exec_command(cmd, timeout=60)
        if data is not None:
            stdin.write(data)
            stdin.channel.shutdown_write()
        out = stdout.read()
        code = stdout.channel.recv_exit_status()
        if code != 0:
            raise TransportError(f"`{cmd}` on {self.host} exited {code}: {stderr.read().decode(errors='replace')[-300:]}",
                                 fix=self._fix)
        return out.decode("utf-8", "replace")

    def _has_checkout(self, path):
        probe = f"test -f {shlex.quote(path)}/labkit/agent/server.py && echo have || echo none"
        return self._exec_simple(probe).strip() == "have"

    def _ship_agent(self, python):
        data = agent_zipapp_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        path = f".cache/labkit/agent-{digest}.pyz"
        probe = f"test -s {path} && echo have || echo need"
        if self._exec_simple(probe).strip() != "have":
            self._exec_simple(f"mkdir -p .cache/labkit && cat > {path}.tmp && mv {path}.tmp {path}", data=data)
        home = self._exec_simple("pwd").strip()
        return f"{home}/{path}"

    def _drain(self):
        while True:
            data = self.chan.recv_stderr(4096)
            if not data:
                break
            self._errbuf += data
            del self._errbuf[:-8192]

    def _stderr_tail(self):
        return bytes(self._errbuf).decode("utf-8", "replace").strip()[-600:]

    def _start_fix(self):
        return ("the SSH user needs passwordless sudo (`sudo -n true` must work on the target) and python3 "
                "3.9+; " + self._fix)

    def describe(self):
        return f"ssh {self.user}@{self.host}:{self.port}: {self.command}" if hasattr(self, "command") else \
            f"ssh {self.user}@{self.host}:{self.port}"

    def close(self):
        chan = getattr(self, "chan", None)
        if chan is not None:
            try:
                chan.shutdown_write()
                chan.status_event.wait(5)
            except Exception:  # noqa: BLE001
                pass
        self.client.close()
