"""Specs: what the caller asks for, as frozen records. Pure: no I/O, no kernel, unit-testable.

A spec is validated where it is made (client side, so the student gets the error at once, in the units
it is stored in: bytes, nanocpus) and once more when the agent decodes the request
(``Spec.from_dict``: the agent never trusts the wire); agent functions take the spec objects. Live handles that exist in the kernel live in
the mechanism modules (:mod:`labkit.agent.rootfs`, :mod:`labkit.agent.launch`). Standard library only.
"""
from __future__ import annotations  # the fields' types stay text: no typing module to import (some 3 ms)

import ipaddress
import math
import posixpath
import re

from .arch import CAPS, DOCKER_DEFAULT_CAPS, SYSCALL_FAMILIES, SYSCALLS, normalize_caps, syscall_numbers  # noqa: F401
from .errors import InvalidSpec

#: the namespaces labkit can create, by their names in /proc/<pid>/ns, in teaching order
NAMESPACES = ("uts", "pid", "mnt", "ipc", "net", "user", "cgroup")
NS_ALIASES = {"mount": "mnt", "network": "net", "hostname": "uts", "cgroups": "cgroup", "users": "user"}
NS_MEANING = {
    "uts": "hostname and domain name",
    "pid": "process IDs (the first process inside is PID 1)",
    "mnt": "the mount table (what is mounted where)",
    "ipc": "System V IPC and POSIX message queues",
    "net": "network interfaces, addresses, routes, ports, firewall",
    "user": "user and group IDs (root inside can be nobody outside)",
    "cgroup": "the view of the cgroup tree (/proc/self/cgroup)",
}

STATE_DIR = "/var/lib/labkit"       # persistent: rootfs, images, layers
RUN_DIR = "/run/labkit"             # live: running processes, their logs
DAEMON_SOCKET = f"{RUN_DIR}/labkitd.sock"  # labkit's daemon, its own protocol (labkit.agent.daemon)
DOCKER_SOCKET = f"{RUN_DIR}/docker.sock"   # the same daemon, Docker's Engine API (labkit.agent.dockerapi)
#: the grader's per-submission scratch directories (labkit.course.sandbox), named grade-<slot>-<6 hex>
GRADE_DIR = RUN_DIR + "/grade"
ROOTFS_DIR = STATE_DIR + "/rootfs"
CONTAINERS_DIR = STATE_DIR + "/containers"   # <id>/{upper,work,merged}: a container's overlay root

# Every pattern here is applied with fullmatch: '$' would let a trailing newline through ('demo\n').
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def check_name(name, what="name"):
    """A labkit object name: lower-case letters, digits, '_', '.', '-'; no '..', no '/'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidSpec(f"{what} {name!r} is not allowed",
                          fix="use 1-63 characters from a-z, 0-9, '_', '.', '-', starting with a letter or "
                              "digit and without '..', e.g. 'demo'")
    return name


def whole_number(value, what, low, high, fix):
    """``value`` as an int in low..high: an int, an integral float or a string of digits; anything else
    (a bool, 'abc', 1.5, None) is InvalidSpec, never a ValueError deep inside the agent."""
    n = None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, int):
        n = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,20}", value.strip()):
        n = int(value.strip())
    if n is None:
        raise InvalidSpec(f"{what}={value!r} is not a whole number", fix=fix)
    if not low <= n <= high:
        raise InvalidSpec(f"{what}={n} is out of range ({low}..{high})", fix=fix)
    return n


def normalize_namespaces(names):
    """Accept a list/set/str of namespace names (with aliases); return a sorted tuple in NAMESPACES order."""
    if names is None:
        return ()
    if isinstance(names, str):
        names = [n for n in re.split(r"[,\s]+", names) if n]
    out = set()
    for n in names:
        key = NS_ALIASES.get(str(n).lower(), str(n).lower())
        if key == "all":
            out.update(NAMESPACES)
            continue
        if key not in NAMESPACES:
            raise InvalidSpec(f"unknown namespace {n!r}",
                              fix="choose from " + ", ".join(NAMESPACES) + " (or 'mount', 'network', 'all')")
        out.add(key)
    return tuple(n for n in NAMESPACES if n in out)


def rootfs_path(ref):
    """Path of a labkit rootfs from its name or absolute path; refuse '/' and anything outside labkit's state."""
    if not isinstance(ref, str) or not ref:
        raise InvalidSpec(f"rootfs {ref!r} is not a rootfs name", fix="pass the name of a rootfs made "
                          "with lab.rootfs('demo'), e.g. 'demo'")
    if ref.startswith("/"):
        norm = "/" + posixpath.normpath(ref).lstrip("/")  # normpath keeps a leading "//"
        if norm == "/":
            raise InvalidSpec("a rootfs of '/' would be the host itself, not a container's root",
                              fix="make a rootfs with lab.rootfs('demo') and pass 'demo'")
        parent, name = posixpath.split(norm)
        cdir, cid = posixpath.split(parent)
        if cdir == CONTAINERS_DIR and name == "merged":
            check_name(cid, "container id")
            return norm
        if parent != ROOTFS_DIR:
            raise InvalidSpec(f"rootfs path {ref!r} is outside labkit's state ({ROOTFS_DIR})",
                              fix=f"labkit only enters roots it made under {ROOTFS_DIR} (or a container's "
                                  f"overlay root under {CONTAINERS_DIR}); make one with lab.rootfs('demo')")
        ref = name
    check_name(ref, "rootfs name")
    return ROOTFS_DIR + "/" + ref


def frozen(cls):
    """``@dataclass(frozen=True)``'s behaviour, without the dataclasses module: its import (inspect, ast and
    more) and the code it generates per class cost every labkit command and agent start some 20 ms. The
    fields are the class's own annotated names in order, a class attribute of the same name their default;
    the class gets ``__init__`` (positional or keyword, then ``__post_init__``), ``__repr__``, ``__eq__`` and
    ``__hash__`` over the fields (where it defines none itself), and refuses assignment once made
    (``__post_init__`` may normalise with ``object.__setattr__``, as with a dataclass). :func:`fields` and
    :func:`plain` stand for dataclasses.fields and dataclasses.asdict. (The orchestration records in
    :mod:`labkit.wire.orchestration` stay dataclasses: lab 09's students use ``dataclasses.replace``.)"""
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
    for before, after in zip(names, names[1:]):
        if before in defaults and after not in defaults:
            raise TypeError(f"{cls.__name__}: field {after!r} without a default follows one with a default")
    cls._fields, cls._defaults = names, defaults
    for name, fn in (("__init__", _init), ("__repr__", _repr), ("__eq__", _eq), ("__hash__", _hash),
                     ("__setattr__", _refuse_change), ("__delattr__", _refuse_change)):
        if name == "__init__" or cls.__dict__.get(name) is None:
            setattr(cls, name, fn)
    return cls


def _init(self, *args, **kwargs):
    cls = type(self)
    names = cls._fields
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} arguments, {len(args)} were given")
    values = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}")
        if key in values:
            raise TypeError(f"{cls.__name__}() got multiple values for argument {key!r}")
        values[key] = value
    for name in names:
        if name in values:
            object.__setattr__(self, name, values[name])
        elif name in cls._defaults:
            object.__setattr__(self, name, cls._defaults[name])
        else:
            raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
    post = getattr(self, "__post_init__", None)
    if post is not None:
        post()


def _values(self):
    return tuple(getattr(self, n) for n in self._fields)


def _repr(self):
    return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"


def _eq(self, other):
    return _values(self) == _values(other) if other.__class__ is self.__class__ else NotImplemented


def _hash(self):
    return hash(_values(self))


def _refuse_change(self, name, *value):
    raise AttributeError(f"a {type(self).__name__} is frozen: cannot change {name!r} (make a new one)")


def fields(cls):
    """The names of a spec's fields, in order, with whether each has a default: [(name, has_default)]."""
    if hasattr(cls, "__dataclass_fields__"):  # an orchestration record
        import dataclasses
        return [(f.name, f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
                for f in dataclasses.fields(cls)]
    return [(n, n in cls._defaults) for n in cls._fields]


def plain(value):
    """A spec as plain data (dicts, lists, tuples, scalars), nested specs included: dataclasses.asdict's rule."""
    if hasattr(type(value), "__dataclass_fields__"):
        import dataclasses
        return dataclasses.asdict(value)
    if hasattr(type(value), "_fields") and hasattr(type(value), "_defaults"):
        return {n: plain(getattr(value, n)) for n in value._fields}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    return value


def _check_fields(cls, data, what, example):
    """A request's dict for spec ``cls``: an object whose keys are all fields of it, else InvalidSpec."""
    known = {name for name, _ in fields(cls)}
    if not isinstance(data, dict):
        raise InvalidSpec(f"a {what} spec must be an object, not {type(data).__name__}", fix=f"e.g. {example}")
    extra = set(data) - known
    if extra:
        raise InvalidSpec(f"unknown {what} option(s): {', '.join(sorted(map(str, extra)))}",
                          fix="known options: " + ", ".join(sorted(known)))


class Spec:
    """Base of the specs that cross the wire: ``to_dict`` for the request, ``from_dict`` to decode one.

    ``from_dict`` refuses anything but an object of known fields with the required ones present, then
    validates by constructing the spec: the one place the agent turns a request into a spec."""

    _what = "spec"
    _example = "{}"

    def to_dict(self):
        return plain(self)

    @classmethod
    def from_dict(cls, data):
        _check_fields(cls, data, cls._what, cls._example)
        missing = [name for name, has_default in fields(cls) if not has_default and name not in data]
        if missing:
            raise InvalidSpec(f"a {cls._what} spec needs {', '.join(missing)}", fix=f"e.g. {cls._example}")
        return cls(**data)


@frozen
class RootfsSpec(Spec):
    """A root filesystem to build under /var/lib/labkit/rootfs/<name> from the built-in 'busybox' image."""
    name: str
    image: str = "busybox"
    hostname: str = "labkit"

    _what = "rootfs"
    _example = "{'name': 'demo'}"

    def __post_init__(self):
        check_name(self.name, "rootfs name")
        if self.image != "busybox":
            raise InvalidSpec(f"unknown built-in image {self.image!r}",
                              fix="the built-in image is 'busybox' (images from a registry come with `labkit pull`)")
        check_hostname(self.hostname)

    @property
    def path(self):
        return rootfs_path(self.name)


def check_hostname(name):
    if not isinstance(name, str) or len(name) > 64 or not _HOST_RE.fullmatch(name):
        raise InvalidSpec(f"hostname {name!r} is not valid",
                          fix="use letters, digits and '-' (at most 63 per label, 64 in all), e.g. 'box1'")
    return name


#: uid/gid map for a new user namespace: (inside, outside, count); root inside = an unprivileged uid outside
DEFAULT_ID_MAP = ((0, 100000, 65536),)
#: the highest uid or gid (2**32 - 2; 2**32 - 1 is the kernel's "no id")
MAX_ID = 4294967294
ACTIONS = ("exec", "probe", "escape", "hold")
ROOT_MODES = ("chroot", "pivot_root")


def parse_bind(text):
    """"/host:/inside[:ro]" -> (host, inside, read_only)."""
    parts = str(text).split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise InvalidSpec(f"volume {text!r} is not HOST:CONTAINER[:ro]", fix="e.g. -v /srv/site:/var/www:ro")
    inside = posixpath.normpath("/" + parts[1]) if parts[1].startswith("/") else None
    if inside in (None, "/") or "\0" in parts[1] or "\n" in parts[1]:
        raise InvalidSpec(f"volume {text!r}: the path inside must be absolute and not the root itself",
                          fix="e.g. -v /srv/site:/var/www")
    return parts[0], "/" + inside.lstrip("/"), len(parts) == 3 and parts[2] == "ro"


def env_pairs(env):
    """An environment as (name, value) pairs in the order given: from a dict or a list of pairs."""
    if isinstance(env, dict):
        pairs = tuple((str(k), str(v)) for k, v in env.items())
    elif isinstance(env, (list, tuple)) and all(isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in env):
        pairs = tuple((str(k), str(v)) for k, v in env)
    else:
        raise InvalidSpec(f"env {env!r} is not a dict or a list of (name, value) pairs",
                          fix="e.g. env={'LANG': 'C.UTF-8'}")
    for k, v in pairs:
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise InvalidSpec(f"environment variable {k!r} cannot be set",
                              fix="use a non-empty name without '=' and no NUL bytes, e.g. ('LANG', 'C.UTF-8')")
    return pairs


def argv_tuple(argv, what="argv", example="['hostname']"):
    """A command as a tuple of strings (never a string a shell would split)."""
    if isinstance(argv, str):
        raise InvalidSpec(f"{what} must be a list of arguments, not the string {argv!r}",
                          fix=f"write {argv.split()!r} instead, or ['sh', '-c', {argv!r}]")
    if not isinstance(argv, (list, tuple)):
        raise InvalidSpec(f"{what} must be a list of arguments, not {type(argv).__name__}", fix=f"e.g. {what}={example}")
    out = tuple(str(a) for a in argv)
    if any("\0" in a for a in out):
        raise InvalidSpec("an argument holds a NUL byte, which no program can receive", fix=f"remove the '\\0' from {what}")
    return out


#: a named volume (Docker's rule, bounded): what ``-v NAME:/path`` may name instead of a host path
VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")


def bind_triples(binds, volumes=False):
    """Bind mounts as (host path, path inside, read-only) from "SRC:DST[:ro]" strings or triples; with
    ``volumes`` (a container's), SRC may also be a volume's name."""
    out = []
    for b in binds:
        src, dst, ro = parse_bind(b) if isinstance(b, str) else (list(b) + [False])[:3]
        named = volumes and isinstance(src, str) and VOLUME_NAME.fullmatch(src)
        if not (str(src).startswith("/") or named) or not str(dst).startswith("/") or ".." in str(dst).split("/"):
            raise InvalidSpec(f"bind {src}:{dst} needs absolute paths" + (" (or a volume's name)" if volumes else "")
                              + " and no '..' inside", fix="e.g. -v /srv/site:/var/www:ro" + (
                                  " or -v notes:/data" if volumes else ""))
        out.append((str(src), posixpath.normpath(str(dst)), bool(ro)))
    return tuple(out)


def check_user(user):
    """A numeric "uid[:gid]" (names would need the container's /etc/passwd)."""
    m = re.fullmatch(r"([0-9]{1,10})(?::([0-9]{1,10}))?", str(user))
    if not m or any(int(x) > MAX_ID for x in m.groups() if x is not None):
        raise InvalidSpec(f"user {user!r} must be numeric uid[:gid] (0..{MAX_ID})",
                          fix="e.g. user='1000' or '1000:1000'")
    return str(user)


@frozen
class ProcessSpec(Spec):
    """A process to start: which namespaces it gets, which root it sees, what it runs.

    - ``argv``: the program (looked up in the new root's PATH); empty with action 'hold' means
      "sleep until stopped", with 'probe' "report what you see and exit".
    - ``namespaces``: names from :data:`NAMESPACES`; ``hostname`` needs 'uts'.
    - ``rootfs``: name of a labkit rootfs; ``root_mode`` 'chroot' or 'pivot_root' (needs 'mnt').
    - ``mount_proc``: mount a fresh /proc (default: when there is a new PID namespace or a rootfs).
    - ``id_map``: the uid and gid map of a new user namespace.
    - ``action``: 'exec' (run argv), 'hold' (keep running), 'probe' (report the view),
      'escape' (try the classic chroot escape, then report the view).
    - ``cgroup``: name of a labkit cgroup the process joins before anything else (so its limits hold
      from its first instruction, and a new cgroup namespace is rooted there).
    - ``network``: a labkit network to join (needs 'net'): eth0, an address (``ip`` or the next free
      one), a default route, and ``ports`` published as "HOST:CONTAINER", all before the program starts.
    - ``binds``: (host path, path inside, read-only) bind mounts into the rootfs (needs 'mnt');
      ``read_only``: the root is mounted read-only; ``user``: "uid[:gid]" to run as.
    - ``cap_keep``: capabilities left in the bounding set (None: all; ``DOCKER_DEFAULT_CAPS`` is
      Docker's default); ``seccomp_deny``: syscalls a seccomp filter makes fail with EPERM;
      ``proc_sys_ro``: /proc/sys and /proc/sysrq-trigger read-only, as Docker mounts them.
    - ``look``: record the process's own view before it execs (what it sees of the host); the engine
      turns it off, it costs a millisecond or two per start.
    - ``tty``: its stdin is a terminal (a pseudo-terminal's slave) to make its controlling terminal, in a
      session of its own, as ``docker run -t`` does.
    """
    argv: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    hostname: str | None = None
    rootfs: str | None = None
    root_mode: str = "chroot"
    mount_proc: bool | None = None
    id_map: tuple[tuple[int, int, int], ...] = DEFAULT_ID_MAP
    action: str = "exec"
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/"
    cgroup: str | None = None
    network: str | None = None
    ports: tuple[str, ...] = ()
    ip: str | None = None
    binds: tuple[tuple[str, str, bool], ...] = ()
    read_only: bool = False
    user: str | None = None
    look: bool = True
    cap_keep: tuple[str, ...] | None = None
    seccomp_deny: tuple[str, ...] = ()
    proc_sys_ro: bool = False
    tty: bool = False

    _what = "process"
    _example = "{'argv': ['hostname']}"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (a frozen spec normalised as it is made)
        set_("argv", argv_tuple(self.argv))
        set_("namespaces", normalize_namespaces(self.namespaces))
        pairs = env_pairs(self.env)
        set_("env", tuple(sorted(pairs)) if isinstance(self.env, dict) else pairs)
        if not isinstance(self.id_map, (list, tuple)) or not all(
                isinstance(m, (list, tuple)) and len(m) == 3 for m in self.id_map):
            raise InvalidSpec(f"id_map {self.id_map!r} is not a list of (inside, outside, count)",
                              fix="e.g. [(0, 100000, 65536)]")
        id_fix = "use (inside, outside, count) with ids 0..4294967294 and count >= 1, e.g. (0, 100000, 65536)"
        set_("id_map", tuple((whole_number(i, "id map inside id", 0, MAX_ID, id_fix),
                              whole_number(o, "id map outside id", 0, MAX_ID, id_fix),
                              whole_number(c, "id map count", 1, MAX_ID + 1, id_fix)) for i, o, c in self.id_map))
        if self.action not in ACTIONS:
            raise InvalidSpec(f"unknown action {self.action!r}", fix="use one of " + ", ".join(ACTIONS))
        if self.action == "exec" and not self.argv:
            raise InvalidSpec("nothing to run: argv is empty", fix="pass a command, e.g. argv=['hostname']")
        if self.hostname is not None:
            check_hostname(self.hostname)
            if "uts" not in self.namespaces:
                raise InvalidSpec("setting a hostname without a new UTS namespace would rename the host",
                                  fix="add 'uts' to namespaces")
        if self.rootfs is not None:
            rootfs_path(self.rootfs)
        if self.root_mode not in ROOT_MODES:
            raise InvalidSpec(f"unknown root_mode {self.root_mode!r}", fix="use 'chroot' or 'pivot_root'")
        if self.root_mode == "pivot_root" and "mnt" not in self.namespaces:
            raise InvalidSpec("pivot_root needs a private mount namespace (it changes the root of the "
                              "whole mount namespace, the host's if shared)", fix="add 'mnt' to namespaces")
        set_("tty", _flag(self.tty, "tty"))
        if not self.look and self.action in ("probe", "escape"):
            raise InvalidSpec(f"action {self.action!r} is all about looking", fix="leave look=True")
        if self.action == "escape" and self.rootfs is None:
            raise InvalidSpec("an escape needs a root to escape from", fix="pass rootfs='demo'")
        for inside, outside, count in self.id_map:
            if min(inside, outside) < 0 or count < 1:
                raise InvalidSpec(f"bad id map entry {(inside, outside, count)}",
                                  fix="use (inside, outside, count) with count >= 1, e.g. (0, 100000, 65536)")
        if self.cgroup is not None:
            check_name(self.cgroup, "cgroup name")
        set_("ports", tuple(str(p) for p in self.ports))
        if self.network is not None:
            NetworkSpec(name=self.network)
            if "net" not in self.namespaces:
                raise InvalidSpec("joining a network needs a network namespace of its own",
                                  fix="add 'net' to namespaces")
            for p in self.ports:
                PortSpec.parse(p)
        elif self.ports or self.ip:
            raise InvalidSpec("ports and ip need a network", fix="pass network='default'")
        set_("binds", bind_triples(self.binds))
        if (self.binds or self.read_only) and (self.rootfs is None or "mnt" not in self.namespaces):
            raise InvalidSpec("bind mounts and a read-only root need a rootfs and a mount namespace",
                              fix="pass rootfs=... and add 'mnt' to namespaces")
        if self.user is not None:
            check_user(self.user)
        if not isinstance(self.cwd, str) or "\0" in self.cwd or not self.cwd.startswith("/"):
            raise InvalidSpec(f"cwd {self.cwd!r} must be an absolute path", fix="e.g. cwd='/'")
        if self.proc_sys_ro and (self.rootfs is None or "mnt" not in self.namespaces):
            raise InvalidSpec("a read-only /proc/sys is mounted in the container's own root",
                              fix="pass rootfs=... and add 'mnt' to namespaces")
        if self.cap_keep is not None:
            if isinstance(self.cap_keep, str):
                raise InvalidSpec("cap_keep must be a list of capability names", fix="e.g. ['NET_BIND_SERVICE']")
            set_("cap_keep", normalize_caps(self.cap_keep))
        if isinstance(self.seccomp_deny, str):
            raise InvalidSpec("seccomp_deny must be a list of syscall names", fix="e.g. ['mkdir']")
        set_("seccomp_deny", tuple(str(n) for n in self.seccomp_deny))
        for name in self.seccomp_deny:
            if not any(name in SYSCALL_FAMILIES or name in t for t in SYSCALLS.values()):
                raise InvalidSpec(f"unknown syscall {name!r} for a seccomp filter",
                                  fix="choose one of " + ", ".join(sorted(set(SYSCALLS["x86_64"]))))

    @property
    def wants_proc(self):
        if self.mount_proc is not None:
            return self.mount_proc
        return "pid" in self.namespaces or self.rootfs is not None



_CPUSET_RE = re.compile(r"[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*")
_SIZE_RE = re.compile(r"\s*([0-9]{1,20}(?:\.[0-9]{1,20})?)\s*([kmgt]?)(i?b?)\s*", re.I | re.ASCII)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_MEMORY = 4 << 20
#: the largest memory or swap limit a spec takes: more than any lab machine has; bigger is a typo
MAX_MEMORY = 4 << 40
#: the kernel's PID_MAX_LIMIT: no pids.max above it can ever bind
MAX_PIDS = 4194304


def parse_size(value, what="memory"):
    """Bytes from 67108864, "64M", "64MiB", "1.5G" (powers of 1024, as Docker's --memory)."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and _SIZE_RE.fullmatch(value):
        num, unit, _ = _SIZE_RE.fullmatch(value).groups()
        n = int(float(num) * _UNITS[unit.lower()])  # at most 1e20 * 2**40: finite
    else:
        raise InvalidSpec(f"{what} limit {value!r} is not a size",
                          fix="write bytes (67108864) or a number with K, M or G (64M, 1.5G)")
    return n


def check_memory(value, what="memory"):
    """A memory (or swap) limit in bytes, from bytes or "64M": at least 4M for memory, at most MAX_MEMORY."""
    n = parse_size(value, what)
    if what == "memory" and n < MIN_MEMORY:
        raise InvalidSpec(f"a memory limit of {n} bytes is too small to start a process",
                          fix="use at least 4M (the lab's hog demo uses 32M)")
    if n < 0:
        raise InvalidSpec(f"{what} cannot be negative", fix=f"use 0 for no {what}")
    if n > MAX_MEMORY:
        raise InvalidSpec(f"a {what} limit of {n} bytes is more than any lab machine has (at most {MAX_MEMORY >> 40} TiB)",
                          fix=f"write the limit with its unit, e.g. {what}='512M' or '2G'; leave {what}=None for no limit")
    return n


def check_cpus(value):
    """A CPU quota in CPUs (0.5 = half of one CPU), 0.01..1024."""
    if isinstance(value, bool):
        value = None
    try:
        cpus = float(value)
    except (TypeError, ValueError):
        raise InvalidSpec(f"cpus={value!r} is not a number", fix="e.g. cpus=0.5") from None
    if not 0.01 <= cpus <= 1024:
        raise InvalidSpec(f"cpus={cpus} is out of range", fix="use 0.01 or more, e.g. 0.5")
    return cpus


def nano_cpus(cpus):
    """Docker's NanoCpus for ``--cpus`` (0.5 -> 500000000)."""
    return int(round(check_cpus(cpus) * 1e9))


def check_pids(value):
    return whole_number(value, "pids", 1, MAX_PIDS,
                        f"give the most processes the group may hold, 1..{MAX_PIDS}, e.g. pids=32")


@frozen
class CgroupSpec(Spec):
    """A cgroup below labkit's parent and its limits; None leaves a limit as the kernel's default.

    - ``memory``: bytes or "64M" (``memory.max`` / ``memory.limit_in_bytes``); at least 4M.
    - ``swap``: extra swap allowed on top of ``memory`` (default 0 when memory is limited, so a hog
      meets the OOM killer at the limit instead of swapping).
    - ``cpus``: a CPU quota in CPUs (0.5 = half of one CPU per period); ``period_us`` the period.
    - ``cpu_weight``: relative share when CPUs are contended, 1..10000 (default 100).
    - ``pids``: the most processes and threads the group may hold.
    - ``cpuset``: the CPUs the group may run on, e.g. "0" or "0-1".
    - ``devices``: "docker" for Docker's device allow-list (null, zero, full, random, urandom, tty,
      console, ptmx, pts, tun; mknod of any), None for the kernel's default (every device).
    """
    name: str
    memory: int | None = None
    swap: int | None = None
    cpus: float | None = None
    period_us: int = 100000
    cpu_weight: int | None = None
    pids: int | None = None
    cpuset: str | None = None
    devices: str | None = None

    _what = "cgroup"
    _example = "{'name': 'box', 'memory': '32M'}"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (a frozen spec normalised as it is made)
        check_name(self.name, "cgroup name")
        if self.devices not in (None, "docker"):
            raise InvalidSpec(f"devices={self.devices!r} is not a device policy",
                              fix="'docker' (Docker's allow-list) or None (every device)")
        if self.memory is not None:
            set_("memory", check_memory(self.memory, "memory"))
            if self.swap is None:
                set_("swap", 0)
        if self.swap is not None:
            set_("swap", check_memory(self.swap, "swap"))
        if self.cpus is not None:
            set_("cpus", check_cpus(self.cpus))
        set_("period_us", whole_number(self.period_us, "period_us", 1000, 1000000,
                                       "use microseconds from 1000 to 1000000 (default 100000)"))
        if self.cpu_weight is not None:
            set_("cpu_weight", whole_number(self.cpu_weight, "cpu_weight", 1, 10000, "use 1..10000 (default 100)"))
        if self.pids is not None:
            set_("pids", check_pids(self.pids))
        if self.cpuset is not None and not _CPUSET_RE.fullmatch(str(self.cpuset)):
            raise InvalidSpec(f"cpuset {self.cpuset!r} is not a CPU list", fix='e.g. "0" or "0-1" or "0,2"')

    @property
    def quota_us(self):
        return None if self.cpus is None else max(1000, int(round(self.cpus * self.period_us)))


_REF_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_PART = re.compile(r"(?:localhost|[a-z0-9-]+(\.[a-z0-9-]+)+|[0-9]{1,3}(\.[0-9]{1,3}){3})(:[0-9]{1,5})?"
                        r"|[a-z0-9-]+:[0-9]{1,5}")


@frozen
class ImageRef:
    """An image reference: ``[host[:port]/]name[:tag]``, name = lower-case components separated by '/'.

    Stored at /var/lib/labkit/images/<name>/<tag>.json, so every component is checked: no '..', no empty
    component, no leading '/'. A first component that looks like a host (has a dot or a port, or is
    localhost) names the registry; without one the registry is Docker Hub."""
    name: str
    tag: str = "latest"

    @classmethod
    def parse(cls, ref):
        if isinstance(ref, ImageRef):
            return ref
        if not isinstance(ref, str) or not ref:
            raise InvalidSpec(f"image {ref!r} is not an image name", fix="e.g. 'busybox' or 'myapp:v1'")
        name, tag = ref, "latest"
        last = ref.rsplit("/", 1)[-1]
        if ":" in last:
            name, tag = ref.rsplit(":", 1)
        return cls(name, tag)

    def __post_init__(self):
        if not isinstance(self.name, str) or not isinstance(self.tag, str):
            raise InvalidSpec(f"image {self.name!r}:{self.tag!r} is not an image name",
                              fix="e.g. 'busybox' or 'myapp:v1'")
        parts = self.name.split("/")
        if len(parts) > 1 and _HOST_PART.fullmatch(parts[0]):
            parts = parts[1:]  # a registry host in front: 127.0.0.1:5000/course/web, docker.io/library/nginx
        if ".." in self.name or any(not _REF_COMPONENT.fullmatch(p) for p in parts) or len(self.name) > 255:
            raise InvalidSpec(f"image name {self.name!r} is not allowed",
                              fix="use lower-case letters, digits and . _ - in components separated by '/', "
                                  "without '..' (e.g. 'busybox', 'course/web')")
        if not _TAG_RE.fullmatch(self.tag):
            raise InvalidSpec(f"tag {self.tag!r} is not allowed", fix="use letters, digits, '_', '.', '-', e.g. 'v1'")

    def __str__(self):
        return f"{self.name}:{self.tag}"

    @property
    def registry(self):
        """(host, repository) the way a registry client sees this name (Docker Hub by default)."""
        parts = self.name.split("/")
        if len(parts) > 1 and _HOST_PART.fullmatch(parts[0]):
            host, repo = parts[0], "/".join(parts[1:])
        else:
            host, repo = "docker.io", self.name
        if host == "docker.io":
            host = "registry-1.docker.io"
            if "/" not in repo:
                repo = "library/" + repo
        return host, repo


@frozen
class NetworkSpec(Spec):
    """A labkit bridge network: bridge ``lkbr-<name>``, an IPv4 /16../29 subnet, the gateway at .1."""
    name: str = "default"
    subnet: str = "10.213.0.0/24"

    _what = "network"
    _example = "{'name': 'default', 'subnet': '10.213.0.0/24'}"

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z0-9]{1,8}", self.name):
            raise InvalidSpec(f"network name {self.name!r} is not allowed",
                              fix="use 1-8 lower-case letters or digits (the bridge is lkbr-<name>)")
        try:
            net = ipaddress.ip_network(self.subnet, strict=True)
        except (TypeError, ValueError) as exc:
            raise InvalidSpec(f"subnet {self.subnet!r}: {exc}", fix="e.g. 10.213.0.0/24") from None
        if net.version != 4 or not 16 <= net.prefixlen <= 29 or not net.is_private:
            raise InvalidSpec(f"subnet {self.subnet} must be a private IPv4 /16 to /29",
                              fix="e.g. 10.213.0.0/24 (it must not clash with the host's own networks)")

    @property
    def bridge(self):
        return "lkbr-" + self.name


CLUSTER_NAME = re.compile(r"[a-z0-9]{1,6}")


def check_machine_address(address):
    """A cluster machine's address: a private IPv4 address, not loopback (another computer on a private network)."""
    try:
        if not isinstance(address, str):
            raise TypeError
        ip = ipaddress.IPv4Address(address)
    except (TypeError, ValueError):
        raise InvalidSpec(f"machine address {address!r} is not an IPv4 address",
                          fix="the worker VM's private address, e.g. 192.168.56.11") from None
    if not ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        raise InvalidSpec(f"machine address {address} is not a private network's address",
                          fix="a cluster reaches its machines on a private network, e.g. 192.168.56.11")
    return str(ip)


def check_cluster_name(name):
    """A cluster's name: 1-6 lower-case letters or digits (its network is cl<name>, its nodes <name>-<node>)."""
    if not isinstance(name, str) or not CLUSTER_NAME.fullmatch(name):
        raise InvalidSpec(f"cluster name {name!r} is not allowed", fix="use 1-6 lower-case letters or digits, "
                                                                      "e.g. 'demo'")
    return name


@frozen
class NodeSpec(Spec):
    """A node of a cluster (:mod:`labkit.agent.node`): on one host, a "machine" made of namespaces, a cgroup
    subtree and labkit's engine; or, with ``machine`` (its address on a private network), a computer of its own
    that runs labkit's agent (:mod:`labkit.agent.machine`: a worker VM of a multi-machine Vagrantfile).
    ``cluster`` 1-6 lower-case letters or digits, ``name`` a hostname of up to 15 characters; ``network``: the
    cluster's labkit network it joins (``ip`` on it, or the next free one; not used by a machine)."""
    cluster: str
    name: str
    network: str
    ip: str | None = None
    machine: str | None = None

    _what = "node"
    _example = "{'cluster': 'demo', 'name': 'worker1', 'network': 'cldemo'}"

    def __post_init__(self):
        check_cluster_name(self.cluster)
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", self.name):
            raise InvalidSpec(f"node name {self.name!r} is not allowed",
                              fix="use 1-15 lower-case letters, digits or inner '-', e.g. 'worker1'")
        NetworkSpec(name=self.network)
        if self.ip is not None:
            try:
                ipaddress.IPv4Address(self.ip)
            except (TypeError, ValueError):
                raise InvalidSpec(f"node address {self.ip!r} is not an IPv4 address", fix="e.g. 10.209.0.11") from None
        if self.machine is not None:
            check_machine_address(self.machine)

    @property
    def id(self):
        """``<cluster>-<name>``: the node's state file, its process entry and cgroup names (node-<id>)."""
        return f"{self.cluster}-{self.name}"


@frozen
class ClusterSpec(Spec):
    """A cluster of nodes (:mod:`labkit.agent.cluster`): one manager and ``workers`` workers on the labkit
    network ``cl<name>`` (``subnet``) of this host; or, with ``machines`` (the addresses of worker machines on a
    private network, such as the worker VMs of ``LABKIT_VM_NODES=3 vagrant up``), the manager here and one
    worker on each machine (``workers`` is then their number). Node i's containers get the i-th /24 of
    ``tasks`` (the manager's the first), routed to that node, so that every task has an address of its own
    across the cluster; the last /24 of ``tasks`` holds the services' virtual addresses."""
    name: str
    workers: int = 2
    subnet: str = "10.209.0.0/24"
    tasks: str = "10.214.0.0/16"
    machines: tuple = ()

    _what = "cluster"
    _example = "{'name': 'demo', 'workers': 2}"

    def __post_init__(self):
        check_cluster_name(self.name)
        if isinstance(self.machines, (str, bytes)) or not isinstance(self.machines, (list, tuple)):
            raise InvalidSpec(f"machines {self.machines!r} is not a list of addresses",
                              fix="e.g. ['192.168.56.11', '192.168.56.12'] (the worker VMs' private addresses)")
        machines = tuple(check_machine_address(m) for m in self.machines)
        if len(set(machines)) != len(machines) or len(machines) > 8:
            raise InvalidSpec(f"machines {list(machines)}: each machine once, at most 8",
                              fix="name every worker machine's address once")
        object.__setattr__(self, "machines", machines)
        if machines and self.workers not in (2, len(machines)):  # (2: the default, left as it was)
            raise InvalidSpec(f"workers={self.workers!r} but {len(machines)} machines: a worker runs on each machine",
                              fix="leave workers out when you name the machines")
        if machines:
            object.__setattr__(self, "workers", len(machines))
        object.__setattr__(self, "workers", whole_number(self.workers, "workers", 0, 8,
                                                         "a cluster on one host has 0 to 8 workers"))
        NetworkSpec(name=self.network, subnet=self.subnet)
        try:
            tasks = ipaddress.ip_network(self.tasks, strict=True)
        except (TypeError, ValueError) as exc:
            raise InvalidSpec(f"tasks {self.tasks!r}: {exc}", fix="e.g. 10.214.0.0/16") from None
        if tasks.version != 4 or not tasks.is_private or tasks.prefixlen > 24 - 4:
            raise InvalidSpec(f"tasks {self.tasks} must be a private IPv4 network of at least 16 /24s",
                              fix="e.g. 10.214.0.0/16")
        if tasks.overlaps(ipaddress.ip_network(self.subnet)):
            raise InvalidSpec(f"tasks {self.tasks} overlaps the cluster's subnet {self.subnet}",
                              fix="give them apart, e.g. subnet 10.209.0.0/24 and tasks 10.214.0.0/16")
        for m in machines:
            if ipaddress.IPv4Address(m) in tasks or ipaddress.IPv4Address(m) in ipaddress.ip_network(self.subnet):
                raise InvalidSpec(f"machine {m} is inside the cluster's own ranges ({self.subnet}, {self.tasks})",
                                  fix="the machines' addresses are on their private network, e.g. 192.168.56.11")

    @property
    def network(self):
        return "cl" + self.name

    def node_names(self):
        return ["manager"] + [f"worker{i}" for i in range(1, self.workers + 1)]

    def machine_of(self, index):
        """The address of node ``index``'s machine, or None for a node on this host (the manager always is)."""
        return self.machines[index - 1] if self.machines and index > 0 else None

    def task_subnet(self, index):
        return str(list(ipaddress.ip_network(self.tasks).subnets(new_prefix=24))[index])

    @property
    def vip_subnet(self):
        """The last /24 of ``tasks``: one virtual address per service, that its name resolves to (lab 09)."""
        return self.task_subnet(-1)


def check_port(value, what="port"):
    """A TCP/UDP port: a whole number 1..65535 (never a string that reaches a shell)."""
    return whole_number(value, what, 1, 65535, "ports are whole numbers 1..65535, e.g. 8080")


@frozen
class PortSpec:
    """``-p [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]``."""
    host_port: int
    container_port: int
    host_ip: str = "0.0.0.0"
    proto: str = "tcp"

    @classmethod
    def parse(cls, text):
        if isinstance(text, PortSpec):
            return text
        m = re.fullmatch(r"(?:([0-9]{1,3}(?:\.[0-9]{1,3}){3}):)?([0-9]{1,5}):([0-9]{1,5})(?:/(tcp|udp))?", str(text))
        if not m:
            raise InvalidSpec(f"port mapping {text!r} is not HOST:CONTAINER",
                              fix="e.g. '8080:80' or '127.0.0.1:8080:80/tcp'")
        return cls(int(m.group(2)), int(m.group(3)), m.group(1) or "0.0.0.0", m.group(4) or "tcp")

    def __post_init__(self):
        for field in ("host_port", "container_port"):
            object.__setattr__(self, field, check_port(getattr(self, field), field))
        try:
            if not isinstance(self.host_ip, str):
                raise TypeError(self.host_ip)
            ipaddress.IPv4Address(self.host_ip)
        except (TypeError, ValueError):
            raise InvalidSpec(f"host_ip {self.host_ip!r} is not an IPv4 address",
                              fix="e.g. '127.0.0.1' (this host only) or '0.0.0.0' (every address)") from None
        if self.proto not in ("tcp", "udp"):
            raise InvalidSpec(f"protocol {self.proto!r}", fix="tcp or udp")

    @property
    def text(self):
        """The mapping written out in full: "IP:HOST:CONTAINER/PROTO"."""
        return f"{self.host_ip}:{self.host_port}:{self.container_port}/{self.proto}"

    def to_dict(self):
        return plain(self)


@frozen
class ContainerSpec(Spec):
    """`docker create`'s options, validated once on each side; limits in Docker's own units.

    - ``image``: an image reference (normalised: ``busybox`` -> ``busybox:latest``); ``name``: the
      container's name (None: ``<image>-<id>``); ``cmd``: the program (None: the image's Cmd);
    - ``env`` (name, value) pairs added to the image's; ``hostname`` (None: the container's id);
    - ``ports``: "HOST:CONTAINER" mappings, normalised to "IP:HOST:CONTAINER/PROTO";
    - ``memory`` in bytes (Docker's HostConfig.Memory), ``nano_cpus`` in billionths of a CPU
      (HostConfig.NanoCpus: 500000000 is ``--cpus 0.5``), ``pids_limit`` (HostConfig.PidsLimit);
    - ``binds``: (host path, path inside, read-only), from ``-v SRC:DST[:ro]``; ``read_only`` root;
      ``workdir`` (None: the image's); ``user`` numeric uid[:gid];
    - ``network``: a labkit network to join (None: Docker's ``--network none``, a network namespace with
      only its loopback); ``cap_add``/``cap_drop`` ('ALL' allowed) and
      ``privileged`` change Docker's 14 default capabilities and device allow-list;
    - ``tty``: a terminal as its stdio (``-t``), ``open_stdin``: a stdin that attached clients write to (``-i``),
      ``stdin_once``: that stdin ends when the clients that wrote to it have (``docker run -i``);
    - ``extra_hosts``: (name, IPv4 address) pairs its /etc/hosts maps (``--add-host NAME:IP``; a cluster's
      service names, lab 09).
    """
    image: str = "busybox"
    name: str | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    hostname: str | None = None
    ports: tuple[str, ...] = ()
    memory: int | None = None
    nano_cpus: int | None = None
    pids_limit: int | None = None
    binds: tuple[tuple[str, str, bool], ...] = ()
    read_only: bool = False
    workdir: str | None = None
    user: str | None = None
    network: str | None = "default"
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    privileged: bool = False
    tty: bool = False
    open_stdin: bool = False
    stdin_once: bool = False
    extra_hosts: tuple[tuple[str, str], ...] = ()

    _what = "container"
    _example = "{'image': 'busybox', 'cmd': ['httpd', '-f'], 'memory': 67108864}"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (a frozen spec normalised as it is made)
        set_("image", str(ImageRef.parse(self.image)))
        if self.name is not None:
            check_name(self.name, "container name")
        if self.cmd is not None:
            set_("cmd", argv_tuple(self.cmd, "cmd", "['httpd', '-f']") or None)
        set_("env", env_pairs(self.env))
        if self.hostname is not None:
            check_hostname(self.hostname)
        if isinstance(self.ports, str):
            raise InvalidSpec("ports must be a list of mappings", fix="e.g. ports=['8080:80']")
        set_("ports", tuple(PortSpec.parse(p).text for p in self.ports))
        if self.memory is not None:
            set_("memory", check_memory(self.memory, "memory"))
        if self.nano_cpus is not None:
            set_("nano_cpus", whole_number(self.nano_cpus, "nano_cpus", 10 ** 7, 1024 * 10 ** 9,
                                           "give CPUs as cpus=0.5 (500000000 nano-CPUs); 0.01 to 1024 CPUs"))
        if self.pids_limit is not None:
            set_("pids_limit", check_pids(self.pids_limit))
        if isinstance(self.binds, str):
            raise InvalidSpec("volumes must be a list", fix="e.g. volumes=['/srv/site:/var/www:ro', 'notes:/data']")
        set_("binds", bind_triples(self.binds, volumes=True))
        set_("read_only", _flag(self.read_only, "read_only"))
        set_("privileged", _flag(self.privileged, "privileged"))
        set_("tty", _flag(self.tty, "tty"))
        set_("open_stdin", _flag(self.open_stdin, "open_stdin"))
        set_("stdin_once", _flag(self.stdin_once, "stdin_once"))
        if self.workdir is not None and (not isinstance(self.workdir, str) or not self.workdir.startswith("/")
                                         or "\0" in self.workdir):
            raise InvalidSpec(f"workdir {self.workdir!r} must be an absolute path", fix="e.g. workdir='/srv'")
        if self.user is not None:
            set_("user", check_user(self.user))
        set_("extra_hosts", extra_hosts(self.extra_hosts))
        if self.network is not None:
            NetworkSpec(name=self.network)
        for field in ("cap_add", "cap_drop"):
            names = getattr(self, field)
            if isinstance(names, str):
                raise InvalidSpec(f"{field} must be a list of capability names", fix=f"e.g. {field}=['NET_ADMIN']")
            set_(field, tuple("ALL" if str(c).upper() == "ALL" else normalize_caps([c])[0] for c in names))

    def cgroup(self, name):
        """The spec of this container's cgroup: its limits, and Docker's device allow-list unless privileged."""
        return CgroupSpec(name=name, memory=self.memory, pids=self.pids_limit,
                          cpus=None if self.nano_cpus is None else self.nano_cpus / 1e9,
                          devices=None if self.privileged else "docker")


_HOSTS_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # a name in /etc/hosts (a stack's demo_api too)


def extra_hosts(pairs):
    """``--add-host NAME:IP`` pairs, from "NAME:IP" strings or (name, ip) pairs: at most 256, each name 1-63
    letters, digits, '_', '.', '-', each address IPv4."""
    if isinstance(pairs, (str, dict)) or not isinstance(pairs, (list, tuple)) or len(pairs) > 256:
        raise InvalidSpec("extra_hosts must be a list of at most 256 NAME:IP pairs",
                          fix="e.g. extra_hosts=['api:10.214.255.2']")
    out = []
    for p in pairs:
        if isinstance(p, str):
            p = p.rsplit(":", 1) if ":" in p else (p,)
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise InvalidSpec(f"extra host {p!r} is not NAME:IP", fix="e.g. 'api:10.214.255.2'")
        name, ip = p
        if not isinstance(name, str) or not _HOSTS_NAME_RE.fullmatch(name):
            raise InvalidSpec(f"extra host name {name!r} is not a host name",
                              fix="use 1-63 letters, digits, '_', '.', '-', e.g. 'api'")
        try:
            ip = str(ipaddress.IPv4Address(ip))
        except (TypeError, ValueError):
            raise InvalidSpec(f"extra host {name}: {ip!r} is not an IPv4 address",
                              fix="e.g. 'api:10.214.255.2'") from None
        out.append((name, ip))
    return tuple(out)


def _flag(value, what):
    if not isinstance(value, bool):
        raise InvalidSpec(f"{what}={value!r} must be True or False", fix=f"e.g. {what}=True")
    return value


def _abs_path(path, what):
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or \
            posixpath.normpath(path) != path.rstrip("/") or path == "/":
        raise InvalidSpec(f"{what} {path!r} must be an absolute, normalised path other than /",
                          fix="e.g. /run/labkit/grade/job-1")
    return path


@frozen
class SandboxSpec(Spec):
    """A grader's sandbox (:mod:`labkit.agent.sandbox`): what runs in it and what it may reach.

    - ``kind``: "kernel" (a student's notebook kernel, dropped to ``uid``/``gid``: no capability, no
      network, the host's files as that user sees them minus ``hide``, writable only in ``scratch``,
      /tmp and /dev/shm of its own) or "agent" (a disposable labkit agent, root in fresh mount, network,
      PID, UTS, IPC and cgroup namespaces, with empty labkit state of its own and the host's files
      read-only).
    - ``cgroup``: the labkit cgroup (made beforehand, with its limits) that the sandbox runs in.
    - ``argv``: the program (kind "kernel": the kernel's command; "agent" runs labkit's agent).
    - ``scratch``: the kernel's working directory, the same path inside as outside (its relay socket and
      ZMQ sockets live there).
    - ``hide``: paths the sandbox must not read (a directory is covered by an empty one, a file by
      /dev/null), e.g. the grading bundle and every other submission.
    - ``env``: the environment (nothing of the grader's is passed on unless listed).
    """
    kind: str
    cgroup: str
    argv: tuple[str, ...] = ()
    uid: int = 0
    gid: int = 0
    scratch: str = ""
    hide: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    _what = "sandbox"
    _example = "{'kind': 'agent', 'cgroup': 'grade-1'}"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (a frozen spec normalised as it is made)
        if self.kind not in ("kernel", "agent"):
            raise InvalidSpec(f"sandbox kind {self.kind!r} is not known", fix="use 'kernel' or 'agent'")
        check_name(self.cgroup, "cgroup name")
        set_("argv", argv_tuple(self.argv, "argv"))
        set_("env", env_pairs(self.env))
        set_("hide", tuple(_abs_path(p, "hidden path") for p in (self.hide or ())))
        if self.kind == "kernel":
            if not self.argv:
                raise InvalidSpec("a kernel sandbox needs the kernel's command", fix="argv=['python3', '-m', 'ipykernel_launcher', ...]")
            for k in ("uid", "gid"):
                whole_number(getattr(self, k), k, 1, 2**32 - 2, "an unprivileged id, e.g. 1000001")
            set_("uid", int(self.uid))
            set_("gid", int(self.gid))
            _abs_path(self.scratch, "scratch directory")
        elif self.argv or self.uid or self.gid or self.scratch:
            raise InvalidSpec("an agent sandbox runs labkit's agent as root with empty state: argv, uid, gid "
                              "and scratch are for kernel sandboxes", fix="give only kind, cgroup, hide and env")
