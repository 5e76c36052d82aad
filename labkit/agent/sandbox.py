"""The grader's sandboxes: a student's kernel dropped to a user of its own, and a disposable agent.

``python3 -m labkit.agent.sandbox SPEC_JSON`` (as root) reads a :class:`~labkit.wire.specs.SandboxSpec`
and becomes the sandbox; nothing of it outlives its cgroup, which the grader removes afterwards (and
``labkit cleanup`` finds below labkit's parent if the grader itself was killed).

- **kernel**: joins its cgroup (memory, CPU and pids limits), takes fresh mount, network, IPC and UTS
  namespaces (no network at all: its only way out is the grader's relay, a unix socket in ``scratch``),
  covers /tmp, /var/tmp, /dev/shm and /run with empty ones of its own, hides the paths it is told to
  (the bundle, the other submissions), shows ``scratch`` at its own path, then drops to ``uid``/``gid``
  with no supplementary group, no capability and ``no_new_privs``, and executes the kernel.
- **agent**: root, but in fresh mount, network, PID, UTS, IPC and cgroup namespaces: every mount of the
  host read-only (``rm -rf /`` removes nothing of the host's), the ``hide`` paths covered, its own /proc
  and /sys, the cgroup hierarchies remounted so that whatever it makes lands below its own cgroup, an
  empty /run, /tmp, /dev/shm and /var/lib/labkit (no image, container or state of the host's), and a
  bounding set without the capabilities that reach past namespaces (modules, raw I/O, reboot, clock,
  syslog). PID 1 of the namespace reaps; the agent is its child and serves the protocol on the inherited
  stdin/stdout. Root in it still shares the host's kernel and could remount a host file system
  writable on purpose: this is the sandbox for a trusted class.

Standard library only.
"""
import json
import os
import resource
import sys

from ..wire.errors import InvalidSpec, LabkitError
from ..wire.specs import SandboxSpec
from . import cgroups, kernel

#: what a kernel may keep of the grader's environment (the rest is the sandbox's own)
KERNEL_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "PYTHONHASHSEED", "MPLBACKEND")

#: capabilities an agent sandbox cannot have: they reach past every namespace
AGENT_DROPS = ("CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_BOOT", "CAP_SYS_TIME", "CAP_SYSLOG",
               "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE", "CAP_AUDIT_CONTROL")

NOSUID_NODEV = kernel.MS_NOSUID | kernel.MS_NODEV


def join(name):
    """Move this process into labkit cgroup ``name`` (every hierarchy it has)."""
    for f in cgroups.procs_files(name):
        with open(f, "w") as fh:
            fh.write(str(os.getpid()))


def _tmpfs(target, mode):
    kernel.mount("tmpfs", target, "tmpfs", NOSUID_NODEV, f"mode={mode:o},size=256m")


def _hide(path):
    """Cover ``path``: a directory with an empty root-owned tmpfs, anything else with /dev/null."""
    real = os.path.realpath(path)
    if not os.path.lexists(real):
        return
    if os.path.isdir(real):
        kernel.mount("tmpfs", real, "tmpfs", NOSUID_NODEV | kernel.MS_RDONLY, "mode=0755,size=4k")
    else:
        kernel.mount("/dev/null", real, None, kernel.MS_BIND)


def _show(fd, path):
    """Bind the directory open as ``fd`` at ``path`` (made, root-owned 0755, on the sandbox's own /run)."""
    parts = path.strip("/").split("/")
    cur = ""
    for p in parts:
        cur += "/" + p
        if not os.path.isdir(cur):
            os.mkdir(cur, 0o755)
    kernel.mount(f"/proc/self/fd/{fd}", path, None, kernel.MS_BIND)


def kernel_sandbox(spec):
    """Become the kernel sandbox of ``spec`` and execute its kernel (never returns)."""
    scratch = os.open(spec.scratch, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(scratch)
    if st.st_uid != spec.uid or st.st_mode & 0o077:
        raise InvalidSpec(f"scratch {spec.scratch} must belong to uid {spec.uid} alone (mode 0700)",
                          fix="let the grader make it (labkit grade)")
    os.close(scratch)
    join(spec.cgroup)
    kernel.unshare(kernel.CLONE_NEWNS | kernel.CLONE_NEWNET | kernel.CLONE_NEWIPC | kernel.CLONE_NEWUTS)
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
    # opened again in the new mount namespace (a bind mount takes its source from the caller's namespace)
    scratch = os.open(spec.scratch, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    again = os.fstat(scratch)
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        raise LabkitError(f"scratch {spec.scratch} was replaced while the sandbox was made", fix="grade again")
    kernel.sethostname("grading")
    kernel.mount("sysfs", "/sys", "sysfs", NOSUID_NODEV | kernel.MS_NOEXEC | kernel.MS_RDONLY)  # this netns's view
    for p in spec.hide:
        _hide(p)
    for d, mode in (("/tmp", 0o1777), ("/var/tmp", 0o1777), ("/dev/shm", 0o1777), ("/run", 0o755)):
        if os.path.isdir(d):
            _tmpfs(d, mode)
    _show(scratch, spec.scratch)
    os.close(scratch)
    kernel.link_up("lo")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    env = {k: v for k, v in os.environ.items() if k in KERNEL_ENV or k.startswith("JPY_")}
    env.update({"HOME": spec.scratch, "USER": "student", "LOGNAME": "student", "TMPDIR": "/tmp",
                "IPYTHONDIR": os.path.join(spec.scratch, ".ipython"),
                "JUPYTER_RUNTIME_DIR": os.path.join(spec.scratch, ".runtime"),
                "MPLCONFIGDIR": os.path.join(spec.scratch, ".matplotlib"),
                "XDG_CACHE_HOME": os.path.join(spec.scratch, ".cache"),
                "LABKIT_HEADLESS": "1"})  # no one clicks in a graded notebook: step widgets play to the end
    env.update(dict(spec.env))
    os.setgroups([])
    kernel.setresgid(spec.gid)
    kernel.setresuid(spec.uid)  # from root to another uid: every capability goes with it
    if kernel.libc().prctl(kernel.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise LabkitError("prctl(PR_SET_NO_NEW_PRIVS) failed", fix="this kernel is older than 3.5")
    if os.geteuid() == 0 or os.getuid() == 0:
        raise LabkitError("the kernel sandbox is still root after setresuid", fix="report this")
    os.chdir(spec.scratch)
    os.execvpe(spec.argv[0], list(spec.argv), env)


def _read_only_everywhere():
    """Remount every mount of this (private) mount namespace read-only, deepest last."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            points.append(mp)
    for mp in points:
        try:
            kernel.remount_bind(mp, kernel.MS_RDONLY)
        except (LabkitError, OSError):
            pass  # covered since, or gone: what is left writable is checked below


def _remount_cgroups(hier):
    """Mount every cgroup hierarchy afresh inside the new cgroup namespace (its root: our cgroup)."""
    _tmpfs("/sys/fs/cgroup", 0o755)
    for mp, fstype, ctrls in hier:
        if not mp.startswith("/sys/fs/cgroup/") and mp != "/sys/fs/cgroup":
            continue
        if mp != "/sys/fs/cgroup":
            os.makedirs(mp, 0o755, exist_ok=True)
        if fstype == "cgroup2":
            kernel.mount("cgroup2", mp, "cgroup2", NOSUID_NODEV | kernel.MS_NOEXEC)
        else:
            named = [c for c in ctrls if c.startswith("name=")]
            data = ",".join(ctrls) if not named else ",".join(["none"] + named)
            kernel.mount("cgroup", mp, "cgroup", NOSUID_NODEV | kernel.MS_NOEXEC, data)


def agent_sandbox(spec):
    """Become the agent sandbox of ``spec``: returns the agent's exit status (this process waits for it)."""
    hier = cgroups.hierarchies()
    lay = cgroups.Layout(spec.cgroup)
    join(spec.cgroup)
    kernel.unshare(kernel.CLONE_NEWCGROUP)  # the namespace's root is the sandbox's cgroup
    if lay.v2:  # no process may sit in a v2 group that hands controllers on: the agent lives in a leaf
        leaf = os.path.join(lay.dirs["memory"], "init")
        os.mkdir(leaf)
        with open(os.path.join(leaf, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    kernel.unshare(kernel.CLONE_NEWNS | kernel.CLONE_NEWNET | kernel.CLONE_NEWIPC | kernel.CLONE_NEWUTS
                   | kernel.CLONE_NEWPID)
    pid = os.fork()
    if pid:
        return kernel.wait_exit_code(pid)
    try:  # PID 1 of the sandbox
        kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
        kernel.sethostname("grading-agent")
        os.makedirs("/var/lib/labkit", 0o700, exist_ok=True)
        _read_only_everywhere()
        if os.statvfs("/").f_flag & os.ST_RDONLY == 0:
            raise LabkitError("the host's root file system is still writable in the sandbox", fix="report this")
        for p in spec.hide:
            _hide(p)
        kernel.mount("proc", "/proc", "proc", NOSUID_NODEV | kernel.MS_NOEXEC)
        kernel.mount("sysfs", "/sys", "sysfs", NOSUID_NODEV | kernel.MS_NOEXEC | kernel.MS_RDONLY)
        _remount_cgroups(hier)
        for d in ("/run", "/tmp", "/var/lib/labkit", "/dev/shm"):
            if os.path.isdir(d):
                _tmpfs(d, 0o1777 if d in ("/tmp", "/dev/shm") else 0o755)
        os.makedirs("/run/netns", 0o755)
        os.makedirs("/run/labkit", 0o700)
        kernel.link_up("lo")
        agent = os.fork()
        if agent == 0:
            keep = [c for c in kernel.CAPS if c not in AGENT_DROPS]
            kernel.drop_capabilities(keep)
            os.chdir("/")
            env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                   "PYTHONPATH": _package_parent(), "HOME": "/root"}
            env.update(dict(spec.env))
            os.execve(sys.executable, [sys.executable, "-m", "labkit.agent"], env)
        status = 1
        while True:  # reap every orphan until the agent itself is gone
            try:
                got, st = os.wait()
            except ChildProcessError:
                break
            if got == agent:
                status = os.waitstatus_to_exitcode(st)
                break
        os._exit(status if status >= 0 else 128 - status)
    except BaseException as exc:  # noqa: BLE001 - the child must never return into the caller's code
        sys.stderr.write(f"labkit sandbox: {exc}\n")
        os._exit(125)


def _package_parent():
    """The directory that holds the ``labkit`` package this module is part of."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python3 -m labkit.agent.sandbox SPEC_JSON\n")
        return 2
    os.umask(0o022)  # not whatever the grader's threads had set when this process was forked
    try:
        if os.geteuid() != 0:
            raise LabkitError("a sandbox is made by root", fix="run the grader as root")
        spec = SandboxSpec.from_dict(json.loads(argv[0]))
        if spec.kind == "kernel":
            kernel_sandbox(spec)
            return 125
        return agent_sandbox(spec)
    except (LabkitError, OSError, ValueError) as exc:
        sys.stderr.write(f"labkit sandbox: {exc}\n")
        return 125


if __name__ == "__main__":
    sys.exit(main())
