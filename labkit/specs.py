"""Specs: what the caller asks for, as frozen dataclasses. Pure: no I/O, no kernel, unit-testable.

A spec is validated where it is made (client side, so the student gets the error at once) and again
where it is used (the agent never trusts the wire). Live handles that exist in the kernel live in
the mechanism modules (:mod:`labkit.agent.rootfs`, :mod:`labkit.agent.launch`). Standard library only.
"""
import dataclasses
import posixpath
import re
from dataclasses import dataclass
from typing import Optional, Tuple

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
ROOTFS_DIR = STATE_DIR + "/rootfs"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def check_name(name, what="name"):
    """A labkit object name: lower-case letters, digits, '_', '.', '-'; no '..', no '/'."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise InvalidSpec(f"{what} {name!r} is not allowed",
                          fix="use 1-63 characters from a-z, 0-9, '_', '.', '-', starting with a letter or "
                              "digit and without '..', e.g. 'demo'")
    return name


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
        if parent != ROOTFS_DIR:
            raise InvalidSpec(f"rootfs path {ref!r} is outside labkit's state ({ROOTFS_DIR})",
                              fix=f"labkit only enters roots it made under {ROOTFS_DIR}; make one with "
                                  "lab.rootfs('demo') and pass its name")
        ref = name
    check_name(ref, "rootfs name")
    return ROOTFS_DIR + "/" + ref


@dataclass(frozen=True)
class RootfsSpec:
    """A root filesystem to build under /var/lib/labkit/rootfs/<name> from the built-in 'busybox' image."""
    name: str
    image: str = "busybox"
    hostname: str = "labkit"

    def __post_init__(self):
        check_name(self.name, "rootfs name")
        if self.image != "busybox":
            raise InvalidSpec(f"unknown built-in image {self.image!r}",
                              fix="the built-in image is 'busybox' (images from a registry come with `labkit pull`)")
        check_hostname(self.hostname)

    @property
    def path(self):
        return rootfs_path(self.name)

    def to_dict(self):
        return dataclasses.asdict(self)


def check_hostname(name):
    if not isinstance(name, str) or len(name) > 64 or not _HOST_RE.match(name):
        raise InvalidSpec(f"hostname {name!r} is not valid",
                          fix="use letters, digits and '-' (at most 63 per label, 64 in all), e.g. 'box1'")
    return name


#: uid/gid map for a new user namespace: (inside, outside, count); root inside = an unprivileged uid outside
DEFAULT_ID_MAP = ((0, 100000, 65536),)
ACTIONS = ("exec", "probe", "escape", "hold")
ROOT_MODES = ("chroot", "pivot_root")


@dataclass(frozen=True)
class ProcessSpec:
    """A process to start: which namespaces it gets, which root it sees, what it runs.

    - ``argv``: the program (looked up in the new root's PATH); empty with action 'hold' means
      "sleep until stopped", with 'probe' "report what you see and exit".
    - ``namespaces``: names from :data:`NAMESPACES`; ``hostname`` needs 'uts'.
    - ``rootfs``: name of a labkit rootfs; ``root_mode`` 'chroot' or 'pivot_root' (needs 'mnt').
    - ``mount_proc``: mount a fresh /proc (default: when there is a new PID namespace or a rootfs).
    - ``id_map``: the uid and gid map of a new user namespace.
    - ``action``: 'exec' (run argv), 'hold' (keep running), 'probe' (report the view),
      'escape' (try the classic chroot escape, then report the view).
    """
    argv: Tuple[str, ...] = ()
    namespaces: Tuple[str, ...] = ()
    hostname: Optional[str] = None
    rootfs: Optional[str] = None
    root_mode: str = "chroot"
    mount_proc: Optional[bool] = None
    id_map: Tuple[Tuple[int, int, int], ...] = DEFAULT_ID_MAP
    action: str = "exec"
    env: Tuple[Tuple[str, str], ...] = ()
    cwd: str = "/"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        if isinstance(self.argv, str):
            raise InvalidSpec(f"argv must be a list of arguments, not the string {self.argv!r}",
                              fix=f"write {self.argv.split()!r} instead, or ['sh', '-c', {self.argv!r}]")
        set_("argv", tuple(str(a) for a in self.argv))
        set_("namespaces", normalize_namespaces(self.namespaces))
        if isinstance(self.env, dict):
            set_("env", tuple(sorted((str(k), str(v)) for k, v in self.env.items())))
        else:
            set_("env", tuple(tuple(kv) for kv in self.env))
        set_("id_map", tuple(tuple(int(x) for x in m) for m in self.id_map))
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
        if self.action == "escape" and self.rootfs is None:
            raise InvalidSpec("an escape needs a root to escape from", fix="pass rootfs='demo'")
        for inside, outside, count in self.id_map:
            if min(inside, outside) < 0 or count < 1:
                raise InvalidSpec(f"bad id map entry {(inside, outside, count)}",
                                  fix="use (inside, outside, count) with count >= 1, e.g. (0, 100000, 65536)")
        if not self.cwd.startswith("/"):
            raise InvalidSpec(f"cwd {self.cwd!r} must be an absolute path", fix="e.g. cwd='/'")

    @property
    def wants_proc(self):
        if self.mount_proc is not None:
            return self.mount_proc
        return "pid" in self.namespaces or self.rootfs is not None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - known
        if extra:
            raise InvalidSpec(f"unknown process option(s): {', '.join(sorted(extra))}",
                              fix="known options: " + ", ".join(sorted(known)))
        return cls(**data)
