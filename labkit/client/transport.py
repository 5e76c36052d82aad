"""Transports: how the client reaches the agent. Same protocol, same agent code, three ways in.

- in-process: the client already is root on Linux (CI, grading servers); that channel is the agent's
  own (:class:`labkit.agent.local.InProcess`, handed in by :func:`labkit.connect`), and requests still go
  through the JSON encoding so that behaviour is identical to the other two.
- :class:`Subprocess` (``sudo``): the agent runs as ``sudo -n python3 agent.pyz`` next to an
  unprivileged notebook on a Linux laptop.
- :class:`SSH`: the agent runs over an SSH exec channel (paramiko) on the lab VM or any Linux host,
  with ``sudo -n`` when the SSH user is not root; the agent is shipped as a zipapp when missing. The
  server's host key must be a trusted one (:class:`HostKeyCheck`: known_hosts files, a pinned
  fingerprint, or, for the lab VM, the key stored on the first connect), else labkit does not log in.

Every transport reaches an agent that is root on its target: whoever can use the transport is root there.

Each is a :class:`labkit.wire.channel.Channel` (``Transport`` is the same class). ``agent_zipapp()``
packs the standard-library-only part of labkit (its ``__init__``, the wire, the agent) into one file. The client core in
this module is standard library only; paramiko is imported only by the SSH transport.
"""
import binascii
import collections
import io
import math
import os
import re
import select
import sys
import threading
import time

from ..wire import protocol
from ..wire.channel import Channel
from ..wire.errors import InvalidSpec, LabkitError, PrivilegeError, ProtocolError, TransportError


def _lazy(name):
    """A module imported when first used, not with this one: hashlib, hmac and zipfile cost a `labkit` command
    that never ships an agent or checks a host key some 10 ms of start-up."""
    import importlib
    return importlib.import_module(name)


PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # labkit/
# The agent's files: the package's __init__, the wire contract and the agent subpackage (nothing else:
# the agent imports only the wire).
AGENT_PACKAGES = ("wire", "agent")
AGENT_MAIN = "import sys\nfrom labkit.agent.server import main\nsys.exit(main())\n"


def agent_zipapp_bytes():
    """A zipapp (bytes) holding labkit's agent; deterministic, so its hash names its version."""
    buf = io.BytesIO()
    with _lazy('zipfile').ZipFile(buf, "w", _lazy('zipfile').ZIP_DEFLATED) as z:
        def add(arc, data):
            info = _lazy('zipfile').ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = _lazy('zipfile').ZIP_DEFLATED
            z.writestr(info, data)
        add("__main__.py", AGENT_MAIN)
        with open(os.path.join(PKG_DIR, "__init__.py"), "rb") as f:
            add("labkit/__init__.py", f.read())
        for pkg in AGENT_PACKAGES:
            for fn in sorted(os.listdir(os.path.join(PKG_DIR, pkg))):
                if fn.endswith(".py"):
                    with open(os.path.join(PKG_DIR, pkg, fn), "rb") as f:
                        add(f"labkit/{pkg}/{fn}", f.read())
    return buf.getvalue()


def agent_zipapp(cache_dir=None):
    """Write the zipapp into a cache directory (once per content) and return its path."""
    data = agent_zipapp_bytes()
    digest = _lazy('hashlib').sha256(data).hexdigest()[:16]
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


Transport = Channel  # every transport below is a Channel


class _NoAnswer(Exception):
    """Internal: the time limit ran out (``sent``: whether the request's line went out whole)."""

    def __init__(self, sent):
        super().__init__(sent)
        self.sent = sent


def _ready(src, write, wait):
    """Whether ``src`` (an fd, or an object with fileno()) can be read (written) within ``wait`` seconds
    (None: no limit). poll(), not select(): a notebook may hold more than 1024 files."""
    if hasattr(select, "poll"):
        p = select.poll()
        p.register(src, select.POLLOUT if write else select.POLLIN)
        return bool(p.poll(None if wait is None else int(math.ceil(wait * 1000))))
    r, w, _ = select.select([] if write else [src], [src] if write else [], [], wait)  # Windows: sockets
    return bool(r or w)


class _LineReader:
    """Protocol lines from a pipe (a file descriptor) or an SSH channel (paramiko): each line read within a
    deadline, and never more than protocol.MAX_LINE bytes (and one chunk) of it held in memory."""

    CHUNK = 1 << 20

    def __init__(self, source):
        self._src = source  # an int fd, or an object with fileno() and recv() (paramiko.Channel)
        self._buf = bytearray()
        self._scanned = 0   # bytes of _buf known to hold no newline
        self._eof = False

    def _read(self):
        if isinstance(self._src, int):
            try:
                return os.read(self._src, self.CHUNK)
            except BlockingIOError:
                return None
        return self._src.recv(self.CHUNK)

    def readline(self, timeout):
        """The next line (b"" at EOF); _NoAnswer when none came within ``timeout`` seconds (None or inf:
        no limit); ProtocolError when it grows past MAX_LINE without a newline."""
        deadline = None if timeout is None or math.isinf(timeout) else time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl >= 0:
                line = self._buf[:nl + 1]
                del self._buf[:nl + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            if len(self._buf) > protocol.MAX_LINE:
                raise protocol.long_error("agent", None)
            if self._eof:
                line, self._buf = self._buf, bytearray()
                self._scanned = 0
                return line
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _ready(self._src, False, wait):
                raise _NoAnswer(sent=True)
            chunk = self._read()
            if chunk is None:
                continue
            if not chunk:
                self._eof = True
            self._buf += chunk


class _Stream(Transport):
    """Common code for transports that speak lines over a pair of byte streams."""

    def _start(self, rfile, wfile):
        self._r, self._w = rfile, wfile
        # read and write around the file objects' buffers: poll() on the pipe or channel bounds the wait
        chan = getattr(rfile, "channel", None)
        self._reader = _LineReader(chan if chan is not None else rfile.fileno())
        self._wfd = None
        if getattr(wfile, "channel", None) is None:
            self._wfd = wfile.fileno()
            os.set_blocking(self._wfd, False)
        self._abandoned = collections.deque()  # ids of requests that timed out, oldest first
        self._broken = None
        try:
            line = self._reader.readline(protocol.HELLO_TIMEOUT)
        except _NoAnswer:
            raise TransportError(f"the agent ({self.describe()}) said nothing within {protocol.HELLO_TIMEOUT:g} s "
                                 f"of starting: {self._stderr_tail() or 'no output'}", fix=self._start_fix()) from None
        if not line:
            raise TransportError(f"the agent ({self.describe()}) exited before saying hello: "
                                 f"{self._stderr_tail() or 'no output'}", fix=self._start_fix())
        self.hello = protocol.check_hello(protocol.decode(line, sender="agent"))

    def _start_fix(self):
        return ""

    def _stderr_tail(self):
        return ""

    def _break(self, reason):
        """The stream is out of step (a line cut short or too long): no later answer can be trusted, so
        the connection is closed (our read end first, so an agent still writing stops at once)."""
        self._broken = reason
        for closer in (self._r.close, self.close):
            try:
                closer()
            except Exception:  # noqa: BLE001 - closing a stream already in trouble
                pass

    def _send(self, data, deadline):
        if self._wfd is None:  # an SSH channel: paramiko's window does the flow control
            self._w.write(data)
            self._w.flush()
            return
        view = memoryview(data)
        while view:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _ready(self._wfd, True, wait):
                if len(view) < len(data):
                    self._break("a request was cut short when its time ran out")
                raise _NoAnswer(sent=False)
            try:
                view = view[os.write(self._wfd, view):]
            except BlockingIOError:
                continue

    def _timed_out(self, req, timeout):
        return TransportError(
            f"the agent ({self.describe()}) did not answer {req['method']!r} within {timeout:g} s",
            fix=f"if it is still working, give the call more time: lab.call({req['method']!r}, ..., _timeout=SECONDS), "
                f"or for every call lab.transport.timeout = SECONDS (or LABKIT_TIMEOUT=SECONDS); its late answer "
                f"is dropped. If the agent hangs, reconnect with labkit.connect(...)")

    def _roundtrip(self, req, line, timeout):
        if self._broken:
            raise TransportError(f"the connection to the agent ({self.describe()}) was closed: {self._broken}",
                                 fix="reconnect with labkit.connect(...)")
        deadline = None if math.isinf(timeout) else time.monotonic() + timeout
        sent = False
        try:
            self._send(line, deadline)
            sent = True
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    got = self._reader.readline(wait)
                except ProtocolError:
                    self._break("the agent sent a line longer than the protocol allows")
                    raise
                if not got:
                    break
                try:
                    answer = protocol.decode(got, sender="agent")
                except ProtocolError:
                    if self._abandoned:  # a bad line, but a whole one: the late answer of a timed-out request
                        self._abandoned.popleft()
                        continue
                    raise
                if self._abandoned:  # the agent answers in order: this is the oldest timed-out request's
                    old = self._abandoned.popleft()
                    if answer.get("id") not in (old, None):
                        msg = f"it answered request {answer.get('id')!r} where {old} was due"
                        self._break(msg)
                        raise ProtocolError(f"the agent ({self.describe()}): {msg}",
                                            fix="reconnect with labkit.connect(...)")
                    continue
                return answer
        except _NoAnswer as exc:
            if exc.sent:
                self._abandoned.append(req["id"])
            raise self._timed_out(req, timeout) from None
        except KeyboardInterrupt:  # a notebook's interrupt: keep the stream in step for the next call
            if sent:
                self._abandoned.append(req["id"])
            else:
                self._break("a request was interrupted while it was being sent")
            raise
        except (OSError, ValueError) as exc:
            raise TransportError(f"lost the agent ({self.describe()}): {exc}", fix=self._start_fix()) from None
        raise TransportError(f"the agent ({self.describe()}) closed the connection: {self._stderr_tail()}",
                             fix="reconnect with labkit.connect(...); " + self._start_fix())


class Subprocess(_Stream):
    """The agent as a child process, e.g. ``sudo -n python3 agent.pyz``."""

    def __init__(self, argv, name="subprocess", fix="", timeout=None):
        super().__init__(timeout)
        self.name, self.argv, self._fix = name, list(argv), fix
        self._errbuf = bytearray()
        try:
            subprocess = _lazy("subprocess")
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
        return f"{self.name}: {' '.join(_lazy('shlex').quote(a) for a in self.argv)}"

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
        except _lazy("subprocess").TimeoutExpired:
            proc.kill()
            proc.wait()


class UnixSocket(_Stream):
    """An agent (or a relay to one) listening on a unix socket on this machine: ``unix:///path``.

    The same lines as over a pipe; whoever may connect to the socket reaches whatever is behind it, so such
    a socket lives in a directory only its users can enter (the grader's relay: the student's sandbox)."""

    name = "unix"

    def __init__(self, path, timeout=None, connect_timeout=10, preamble=b""):
        """``preamble``: bytes sent before the agent's hello is read (the grading VM's start line)."""
        import socket
        super().__init__(timeout)
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise InvalidSpec(f"unix socket path {path!r} must be absolute", fix="e.g. unix:///run/labkit/relay.sock")
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(connect_timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise TransportError(f"cannot connect to {path}: {exc.strerror or exc}",
                                 fix="is the agent (or the grader's relay) running, and may this user use its socket?") from None
        self.sock.settimeout(None)
        try:
            if preamble:
                self.sock.sendall(preamble)
            self._start(self.sock.makefile("rb", buffering=0), self.sock.makefile("wb", buffering=0))
        except LabkitError:
            self.close()
            raise
        except OSError as exc:  # it hung up before its hello: an agent dying, or not an agent
            self.close()
            raise TransportError(f"{path} hung up before the agent's hello: {exc.strerror or exc}",
                                 fix="is the agent (or the grader's relay) running? start it again") from None

    def describe(self):
        return f"unix:{self.path}"

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def sudo_transport(python="/usr/bin/python3", wrapper=(), timeout=None):
    """The agent under ``sudo -n`` (no password prompt: a notebook cannot answer one)."""
    if sys.platform != "linux":
        from ..wire.errors import UnsupportedHost
        raise UnsupportedHost(f"the sudo transport runs the agent on this machine, which is {sys.platform}")
    pyz = agent_zipapp()
    argv = list(wrapper) + ["sudo", "-n", python, pyz]
    user = os.environ.get("USER") or "student"
    fix = ("the agent is root, so whoever may start it is root on this machine. If this user may be root here "
           f"(your own laptop), let it start the agent without a password: add the sudoers rule `{user} "
           f"ALL=(root) NOPASSWD: {python}` with visudo (python3 runs any code: this rule makes {user}, and "
           f"every program {user} runs, root without a password). Otherwise use labkit.connect('vagrant'): "
           "root inside the lab VM only")
    try:
        t = Subprocess(argv, name="sudo", fix=fix, timeout=timeout)
    except TransportError as exc:
        raise PrivilegeError(f"could not start the agent with sudo: {exc.message}", fix=fix) from None
    return t


def socket_in_netns(netns, host, port, timeout):
    """A TCP connection made from inside the named network namespace /run/netns/<netns>.

    setns(2) moves only the calling thread, so a short-lived thread enters the namespace, connects,
    and ends; the socket stays in that namespace. Used to reach a VM whose network exists only there."""
    import socket
    out = {}

    def work():
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns_net(fd)
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


def _setns_net(fd):
    """setns(fd, CLONE_NEWNET) for this thread (os.setns from Python 3.12, libc's before)."""
    if hasattr(os, "setns"):
        os.setns(fd, os.CLONE_NEWNET)
        return
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --- SSH host keys: which server this client agrees to talk to ---------------------------------------

class HostKeyError(TransportError):
    """The SSH server's host key is not one this client trusts; the connection was closed before logging in."""


class UnknownHostKey(HostKeyError):
    """No trusted key is known for this host (never connected, or never told which key is right)."""


class HostKeyChanged(HostKeyError):
    """The host offered a key other than the one trusted for it: re-keyed, recreated, or intercepted."""


#: the host key algorithms that a known key of each type can be negotiated with
_ALGORITHMS_FOR_KEY = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}
_KEYSCAN_TYPE = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa", "ssh-dss": "dsa"}
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def fingerprint(key):
    """OpenSSH's SHA256 fingerprint of a public key (a paramiko key), e.g. ``SHA256:uN...``."""
    digest = _lazy('hashlib').sha256(key.asbytes()).digest()
    return "SHA256:" + _lazy("base64").b64encode(digest).decode("ascii").rstrip("=")


def _short_type(key_type):
    return _KEYSCAN_TYPE.get(key_type) or ("ecdsa" if key_type.startswith("ecdsa-") else key_type)


def config_dir():
    """labkit's per-user configuration folder: ``$XDG_CONFIG_HOME/labkit``, else ``~/.config/labkit``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "labkit")


def user_known_hosts():
    """The known_hosts files OpenSSH reads by default: the user's, then the system-wide one."""
    return [os.path.join(os.path.expanduser("~"), ".ssh", "known_hosts"), "/etc/ssh/ssh_known_hosts"]


def _pattern_matches(pattern, name):
    if pattern.startswith("|1|"):
        import paramiko
        try:
            return _lazy('hmac').compare_digest(paramiko.HostKeys.hash_host(name, pattern), pattern)
        except (AssertionError, ValueError, binascii.Error, IndexError):
            return False
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(regex, name.lower()) is not None


def _names_match(patterns, name):
    """OpenSSH's rule for one known_hosts line: some pattern matches and no negated one does."""
    hit = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _pattern_matches(pattern[1:] if negated else pattern, name):
            if negated:
                return False
            hit = True
    return hit


def read_known_hosts(path, name=None):
    """The keys in a known_hosts file, as ``[(marker, key)]``: those whose host patterns match ``name``
    (``host``, or ``[host]:port`` when the port is not 22), or every key when ``name`` is None.
    ``marker`` is ``"@revoked"`` for a revoked key, else ``""``; lines paramiko cannot read are skipped,
    as OpenSSH skips them."""
    import paramiko
    from paramiko.hostkeys import HostKeyEntry, InvalidHostKey
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise HostKeyError(f"cannot read the known hosts file {path}: {exc.strerror}",
                           fix=f"make {path} readable by this user, or remove it") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        marker = ""
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
            if marker != "@revoked":
                continue  # @cert-authority: host certificates are not used here
            line = line.strip()
        try:
            entry = HostKeyEntry.from_line(re.sub(r"[ \t]+", " ", line))
        except (InvalidHostKey, paramiko.SSHException, ValueError, TypeError):
            continue
        if entry is not None and entry.key is not None and (name is None or _names_match(entry.hostnames, name)):
            out.append((marker, entry.key))
    return out


def _write_private(path, text):
    """Write ``text`` to a new file ``path`` (mode 0600, folder 0700), atomically; False when ``path`` exists."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a key stored meanwhile
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: the same, with a small window
            if os.path.exists(path):
                return False
            os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class HostKeyCheck:
    """Which SSH host keys one connection accepts, checked before anything is sent to the server.

    Trusted are: keys for the host in ``known_hosts`` files (the user's ``~/.ssh/known_hosts`` and
    ``/etc/ssh/ssh_known_hosts``, plus ``known_hosts``, a path or a list of paths), and keys pinned by
    fingerprint (``host_key="SHA256:..."`` or a list). A key marked ``@revoked`` is refused. Anything
    else is refused: an unknown key with :class:`UnknownHostKey`, a key other than the trusted one with
    :class:`HostKeyChanged`, each with the fingerprint and how to trust a key after checking it.

    ``tofu`` (trust on first use, for the lab VM): a file of keys kept for one machine. Its keys are
    trusted whatever address the machine answers at; while it holds none, the first key seen is stored
    there (after the login succeeded). The user's own known_hosts files are not read in this mode (old
    VMs behind the same forwarded port would be mistaken for this one). ``label`` names the machine.

    Used by paramiko as the missing-host-key policy of a client that was given no keys of its own, so
    that every key is judged here.
    """

    def __init__(self, host, port=22, known_hosts=None, host_key=None, tofu=None, label=None):
        self.host, self.port = host, int(port)
        self.name = host if self.port == 22 else f"[{host}]:{self.port}"
        if isinstance(known_hosts, (str, os.PathLike)):
            known_hosts = [known_hosts]
        self.explicit = [os.fspath(p) for p in (known_hosts or [])]
        for path in self.explicit:
            if not os.path.isfile(path):
                raise InvalidSpec(f"known_hosts file {path} does not exist",
                                  fix="pass the path of an OpenSSH known_hosts file, e.g. ~/.ssh/known_hosts")
        pins = [host_key] if isinstance(host_key, str) else list(host_key or [])
        for pin in pins:
            if not isinstance(pin, str) or not _FINGERPRINT.fullmatch(pin):
                raise InvalidSpec(f"host_key {pin!r} is not a SHA256 fingerprint",
                                  fix="write it as `ssh-keygen -lf` prints it, e.g. host_key='SHA256:' + 43 characters")
        self.pins = pins
        self.tofu, self.label = (os.fspath(tofu) if tofu else None), label
        self.files = ([] if self.tofu else user_known_hosts()) + self.explicit
        self.accepted = None  # {"type", "fingerprint", "by"} once a key was accepted
        self._store = None

    def where(self):
        return self.label or f"{self.host}:{self.port}"

    def trusted(self):
        """``(trusted, revoked)``: lists of ``(key, where it is trusted)`` for this host."""
        trusted, revoked = [], []
        if self.tofu:
            for _, key in read_known_hosts(self.tofu):
                trusted.append((key, f"stored on first use in {self.tofu}"))
        for path in self.files:
            for marker, key in read_known_hosts(path, self.name):
                (revoked if marker == "@revoked" else trusted).append((key, path))
        return trusted, revoked

    def disabled_algorithms(self):
        """Host key algorithms to leave out so that the server shows a key of a type trusted for it."""
        import paramiko
        trusted, _ = self.trusted()
        allowed = set()
        for key, _ in trusted:
            allowed.update(_ALGORITHMS_FOR_KEY.get(key.get_name(), (key.get_name(),)))
        offered = list(getattr(paramiko.Transport, "_preferred_keys", ()))
        if not allowed or not allowed.intersection(offered):
            return {}
        return {"keys": [a for a in offered if a not in allowed]}

    def trusted_types(self):
        return sorted({key.get_name() for key, _ in self.trusted()[0]})

    # paramiko's MissingHostKeyPolicy interface: the client knows no keys, so it asks about every one
    def missing_host_key(self, client, hostname, key):
        self.check(key)

    def check(self, key):
        kind, fp = key.get_name(), fingerprint(key)
        blob = key.asbytes()
        trusted, revoked = self.trusted()
        for bad, path in revoked:
            if bad.asbytes() == blob:
                raise HostKeyChanged(
                    f"the SSH host key of {self.where()} ({kind} {fp}) is marked @revoked in {path}; "
                    "labkit did not log in",
                    fix=f"do not use this key: ask whoever runs {self.host} for its new one", host=self.host,
                    port=self.port, key_type=kind, fingerprint=fp)
        for good, source in trusted:
            if good.asbytes() == blob:
                self.accepted = {"type": kind, "fingerprint": fp, "by": source}
                return
        for pin in self.pins:
            if _lazy('hmac').compare_digest(pin, fp):
                self.accepted = {"type": kind, "fingerprint": fp, "by": "the host_key fingerprint passed to connect"}
                return
        if trusted or self.pins:
            raise self._changed(kind, fp, trusted)
        if self.tofu:
            self._store = key
            self.accepted = {"type": kind, "fingerprint": fp, "by": f"first use: stored now in {self.tofu}"}
            return
        raise self._unknown(kind, fp)

    def _unknown(self, kind, fp):
        looked = ", ".join(self.files) if self.files else "no known_hosts file"
        short = _short_type(kind)
        port = f"-p {self.port} " if self.port != 22 else ""
        return UnknownHostKey(
            f"the SSH host key of {self.host}:{self.port} is unknown to this client: it offered {kind} {fp} "
            f"(looked for {self.name} in {looked}); labkit did not log in",
            fix=(f"check that {fp} is the host's own key: on the host run `ssh-keygen -lf "
                 f"/etc/ssh/ssh_host_{short}_key.pub` (or ask whoever runs it). If it is, pass "
                 f"host_key={fp!r} to labkit.connect(...), or add it to your known hosts: "
                 f"`ssh-keyscan {port}-t {short} {self.host} >> ~/.ssh/known_hosts` and check that "
                 f"`ssh-keygen -lF '{self.name}'` prints the same {fp}"),
            host=self.host, port=self.port, key_type=kind, fingerprint=fp)

    def _changed(self, kind, fp, trusted):
        was = "; ".join(sorted({f"{k.get_name()} {fingerprint(k)} ({src})" for k, src in trusted}
                               | {f"{pin} (the host_key passed to connect)" for pin in self.pins}))
        details = {"host": self.host, "port": self.port, "key_type": kind, "fingerprint": fp}
        if self.tofu:
            return HostKeyChanged(
                f"the SSH host key of {self.where()} CHANGED: {self.host}:{self.port} offered {kind} {fp}, but "
                f"labkit trusts {was}; labkit did not log in", fix=self.changed_fix(kind, fp), **details)
        return HostKeyChanged(
            f"the SSH host key of {self.host}:{self.port} CHANGED: it offered {kind} {fp}, but this client trusts "
            f"{was}. Either the host was reinstalled or re-keyed, or something is intercepting the connection; "
            "labkit did not log in", fix=self.changed_fix(kind, fp), **details)

    def changed_fix(self, kind="ssh-ed25519", fp="the new fingerprint"):
        if self.tofu:
            return (f"if you recreated this VM (`vagrant destroy`, then `vagrant up`) or regenerated its host "
                    f"keys, delete the stored key (`rm {self.tofu}`; on Windows `del {self.tofu}`) and "
                    f"connect again: labkit then stores the new key. Otherwise do not connect: something else "
                    f"answers at {self.host}:{self.port}")
        files = sorted({src for _, src in self.trusted()[0] if src in self.files})
        remove = " and ".join(f"`ssh-keygen -R '{self.name}' -f {p}`" for p in files)
        new = f"host_key={fp!r}" if fp.startswith("SHA256:") else "host_key='SHA256:...'"
        return (f"do not connect until you know which: on the host run `ssh-keygen -lf "
                f"/etc/ssh/ssh_host_{_short_type(kind)}_key.pub` (or ask whoever runs it). If {fp} is right, "
                + (f"remove the old entry with {remove}, then " if remove else "")
                + f"pass {new} to labkit.connect(...) (in place of the old host_key, if you passed one) "
                "or add the new key to ~/.ssh/known_hosts as for a new host")

    def store(self):
        """Keep the key accepted on first use (call after the login succeeded)."""
        key, self._store = self._store, None
        if key is None or not self.tofu:
            return
        text = (f"# labkit: the SSH host key of {self.where()}, trusted on first use on "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %z')} at {self.host}:{self.port}.\n"
                "# Every later connect must see this key. Delete this file only if the machine was recreated\n"
                "# or re-keyed on purpose: labkit then stores the key it finds on the next connect.\n"
                f"{self.name} {key.get_name()} {key.get_base64()}\n")
        try:
            stored = _write_private(self.tofu, text)
        except OSError as exc:
            raise HostKeyError(f"cannot store the host key of {self.where()} in {self.tofu}: {exc.strerror}",
                               fix=f"make {os.path.dirname(self.tofu)} writable by this user") from None
        if not stored:  # another connect stored a key meanwhile: this one must agree with it
            self.check(key)


def ssh_client(host, port=22, user=None, key_filename=None, password=None, connect_timeout=15, netns=None,
               known_hosts=None, host_key=None, trust_on_first_use=None, trust_label=None):
    """A connected and logged-in paramiko ``SSHClient`` whose server showed a trusted host key
    (:class:`HostKeyCheck`), and the check (``check.accepted`` says which key and why)."""
    try:
        import paramiko
    except ImportError:
        raise TransportError("the SSH transport needs paramiko",
                             fix="pip install paramiko (it is in labkit's dependencies)") from None
    port = int(port)
    check = HostKeyCheck(host, port, known_hosts=known_hosts, host_key=host_key, tofu=trust_on_first_use,
                         label=trust_label)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(check)  # no keys loaded into the client: the check sees every key
    fix = (f"check that sshd runs on {host}:{port} and accepts this key for {user}: "
           f"`ssh -p {port} -i {key_filename} {user}@{host} true`")
    disabled = check.disabled_algorithms()
    try:
        sock = socket_in_netns(netns, host, port, connect_timeout) if netns else None
        client.connect(host, port=port, username=user, key_filename=key_filename, password=password,
                       timeout=connect_timeout, banner_timeout=connect_timeout, sock=sock,
                       auth_timeout=connect_timeout, allow_agent=False, look_for_keys=False,
                       disabled_algorithms=disabled)
        check.store()
    except LabkitError:
        client.close()
        raise
    except Exception as exc:  # noqa: BLE001 - paramiko and socket errors alike
        client.close()
        if disabled and isinstance(exc, getattr(paramiko, "IncompatiblePeer", ())) and "host key" in str(exc):
            types = ", ".join(check.trusted_types()) or "the pinned one"
            raise HostKeyChanged(
                f"the SSH server at {host}:{port} offers no host key of the type trusted for {check.where()} "
                f"({types}): it is not the machine this client knows; labkit did not log in",
                fix=check.changed_fix(), host=host, port=port) from None
        raise TransportError(f"cannot connect over SSH to {user}@{host}:{port}"
                             f"{f' in network namespace {netns}' if netns else ''}: {exc}", fix=fix) from None
    return client, check


def ssh_exec(client, cmd, data=None, fix="", where="the target"):
    """Run ``cmd`` over ``client`` as the SSH user; its stdout as text, a TransportError if it fails."""
    stdin, stdout, stderr = client.exec_command(cmd, timeout=60)
    if data is not None:
        stdin.write(data)
        stdin.channel.shutdown_write()
    out = stdout.read()
    code = stdout.channel.recv_exit_status()
    if code != 0:
        raise TransportError(f"`{cmd}` on {where} exited {code}: {stderr.read().decode(errors='replace')[-300:]}",
                             fix=fix)
    return out.decode("utf-8", "replace")


class SSH(_Stream):
    """The agent over an SSH exec channel (paramiko).

    The server's host key is checked before anything is sent (:class:`HostKeyCheck`): it must be in the
    user's known hosts (``~/.ssh/known_hosts``, ``/etc/ssh/ssh_known_hosts``) or in ``known_hosts`` (a
    file or a list of files), or match ``host_key`` (a ``SHA256:`` fingerprint, or a list); the lab VM
    uses ``trust_on_first_use`` (a per-VM file, see :mod:`labkit.client.vagrant`). ``self.host_key`` says which
    key was accepted and why."""

    name = "ssh"

    def __init__(self, host, port=22, user=None, key_filename=None, sudo=None, python="python3",
                 remote_agent=None, remote_checkout=None, connect_timeout=15, known_hosts=None, password=None,
                 netns=None, host_key=None, trust_on_first_use=None, trust_label=None):
        super().__init__()
        self.host, self.port, self.user = host, int(port), user
        self.client, check = ssh_client(host, port=self.port, user=user, key_filename=key_filename,
                                        password=password, connect_timeout=connect_timeout, netns=netns,
                                        known_hosts=known_hosts, host_key=host_key,
                                        trust_on_first_use=trust_on_first_use, trust_label=trust_label)
        self.host_key = check.accepted
        fix = (f"check that sshd runs on {host}:{port} and accepts this key for {user}: "
               f"`ssh -p {port} -i {key_filename} {user}@{host} true`")
        self._fix = fix
        try:
            remote_uid = self._exec_simple("id -u").strip()
            if sudo is None:
                sudo = remote_uid != "0"
            shlex = _lazy("shlex")
            if remote_agent is None and remote_checkout and self._has_checkout(remote_checkout):
                # the synced checkout (the lab VM): edits on the host reach the agent with `vagrant rsync`
                agent = f"env PYTHONPATH={shlex.quote(remote_checkout)} {shlex.quote(python)} -m labkit.agent"
            else:
                agent = f"{shlex.quote(python)} {shlex.quote(remote_agent or self._ship_agent(python))}"
            cmd = ("sudo -n " if sudo else "") + agent
            self.command = cmd
            chan = self.client.get_transport().open_session(timeout=connect_timeout)
            chan.exec_command(cmd)
        except BaseException:
            self.client.close()
            raise
        self.chan = chan
        self._errbuf = bytearray()
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self._start(chan.makefile("rb"), chan.makefile("wb"))
        except LabkitError:
            self.close()
            raise

    def _exec_simple(self, cmd, data=None):
        return ssh_exec(self.client, cmd, data=data, fix=self._fix, where=self.host)

    def _has_checkout(self, path):
        probe = f"test -f {_lazy('shlex').quote(path)}/labkit/agent/server.py && echo have || echo none"
        return self._exec_simple(probe).strip() == "have"

    def _ship_agent(self, python):
        data = agent_zipapp_bytes()
        digest = _lazy('hashlib').sha256(data).hexdigest()[:16]
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
