"""One submission's sandbox, as the grader holds it: a disposable agent and a kernel that cannot reach out.

:class:`Sandbox` is a context manager; everything it makes it undoes on exit, in reverse order, also when
the submission was killed half-way:

- the **agent** the student's notebook drives: with ``sandbox='container'`` a fresh labkit agent in
  namespaces of its own below a cgroup of its own (:mod:`labkit.agent.sandbox`, kind "agent"; root in
  it shares this host's kernel: for a trusted class), or, with ``target=LAB``, a target the instructor
  made disposable (a VM restored after each class, say) that the grader only connects to;
- the **kernel**'s cgroup (memory, CPU, pids), user id (one per job slot: no two kernels share one) and
  scratch directory under ``/run/labkit/grade`` (0700, its own; the relay socket and ZMQ's ipc sockets
  live there), and a :meth:`kernel_manager` for nbclient that starts the kernel through the sandbox;
- nothing the grader reads (the bundle, every submission, the gradebook) is visible in the kernel's
  mount namespace: :attr:`hide` lists it.

The cgroups are labkit cgroups on the grading host, made through ``host`` (a Lab on this machine, root),
so ``labkit cleanup`` removes whatever a killed grader left.
"""
import json
import os
import secrets
import shutil
import stat
import sys

from ..wire.errors import LabkitError
from ..wire.specs import GRADE_DIR, SandboxSpec

#: where the kernels' scratch directories live (root-only parent; each kernel sees only its own)
SCRATCH_ROOT = GRADE_DIR

#: the first user id the kernels run as (job slot N runs as UID_BASE + N); no account owns these
UID_BASE = 1_990_000

#: a kernel's limits: memory (bytes), CPUs, processes and threads
KERNEL_LIMITS = {"memory": 2 << 30, "cpus": 1.0, "pids": 256}
#: the disposable agent's limits (what the student's containers use counts here)
AGENT_LIMITS = {"memory": 2 << 30, "cpus": 1.0, "pids": 1024}

SANDBOXES = ("vm", "container", "target")
#: the grading VM's memory (MiB); its qemu's cgroup gets AGENT_LIMITS
VM_MEMORY_MB = 1024
#: job slot N's grading VM runs its qemu as UID_BASE + VM_UID_OFFSET + N (not the kernel's user: it could signal it)
VM_UID_OFFSET = 100_000


def _free_uid(slot):
    import pwd
    uid = UID_BASE + slot
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return uid
    raise LabkitError(f"user id {uid} belongs to {pwd.getpwuid(uid).pw_name}: the grader needs ids no account has",
                      fix="remove that account or change labkit.course.sandbox.UID_BASE")


#: what no sandbox may read, where it does not hold the Python that runs in it
ALWAYS_HIDDEN = ("/root", "/home", "/etc/shadow", "/etc/gshadow", "/etc/ssh", "/etc/sudoers", "/etc/sudoers.d",
                 "/var/lib/docker", "/var/lib/labkit", "/var/log")


def _needed_below(path):
    needed = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.executable, _package_dir())]
    return any(n == path or n.startswith(path + "/") for n in needed)


def launcher():
    """How root starts ``labkit.agent.sandbox``: ``python -I`` (no working directory, user site or PYTHON*
    variables on the path: a kernel is started in its scratch directory, where the student may have put a
    ``labkit`` package of their own) with labkit's own folder put first by hand."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(_package_dir())!r}); "
            "from labkit.agent.sandbox import main; sys.exit(main())")
    return [sys.executable, "-I", "-c", code]


def _package_dir():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _visible_to(uid, gid, path):
    """True when ``uid`` may read ``path`` and enter every directory above it."""
    parts = os.path.abspath(path).split("/")
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i]) or "/"
        st = os.stat(p)
        need = 0o1 if os.path.isdir(p) and i < len(parts) else 0o4
        who = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        if not (st.st_mode >> who) & need:
            return False
    return True


class Sandbox:
    """``with Sandbox(host, slot, hide=[...]) as box:`` ``box.lab`` is the agent to drive, ``box.scratch``
    the kernel's directory, ``box.kernel_manager()`` the kernel nbclient runs."""

    def __init__(self, host, slot=None, sandbox="vm", target=None, hide=(), kernel_limits=None,
                 agent_limits=None):
        if sandbox not in SANDBOXES:
            raise LabkitError(f"sandbox {sandbox!r} is not known", fix="use --sandbox vm, --sandbox container, or "
                                                                      "--sandbox target with --target")
        if sandbox == "target" and target is None:
            raise LabkitError("--sandbox target needs the disposable target", fix="add --target ssh://... or vagrant")
        if os.geteuid() != 0:
            raise LabkitError("the grader makes sandboxes and so runs as root", fix="sudo labkit grade ...")
        self.host, self.kind, self.target = host, sandbox, target
        self.hide = tuple(sorted({os.path.realpath(p) for p in hide}))
        for p in self.hide:
            if p == "/" or _needed_below(p):
                raise LabkitError(f"{p} holds the Python or labkit that the kernel runs, so it cannot be hidden from "
                                  f"the kernel", fix="keep submissions, the bundle and --out outside labkit's own folders")
        # the host's secrets too, where they do not hold the Python that runs (a venv in /root, say)
        self.hide += tuple(p for p in ALWAYS_HIDDEN if os.path.lexists(p) and not _needed_below(p))
        self.kernel_limits = dict(KERNEL_LIMITS, **(kernel_limits or {}))
        self.agent_limits = dict(AGENT_LIMITS, **(agent_limits or {}))
        self.lab = self.scratch = None
        self._made = []
        self._fixed_slot = slot

    def _claim_slot(self):
        """A job slot no other sandbox on this machine holds (a lock held while this sandbox lives): its
        number picks the kernel's user id, so that two kernels never share one."""
        import fcntl
        d = os.path.join(SCRATCH_ROOT, "slots")
        os.makedirs(d, 0o700, exist_ok=True)
        for n in ([self._fixed_slot] if self._fixed_slot is not None else range(4096)):
            fd = os.open(os.path.join(d, str(n)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._made.append(("fd", fd))
            return n
        raise LabkitError(f"job slot {self._fixed_slot} is taken by another grader", fix="use another slot")

    # -- making and undoing ---------------------------------------------------------------------------
    def __enter__(self):
        try:
            self._enter()
        except BaseException:
            self.close()
            raise
        return self

    def _enter(self):
        from ..client.lab import Lab
        from ..client.transport import Subprocess
        os.makedirs(SCRATCH_ROOT, 0o700, exist_ok=True)
        os.chmod(SCRATCH_ROOT, 0o700)
        self.slot = self._claim_slot()
        self.uid = self.gid = _free_uid(self.slot)
        self.name = f"grade-{self.slot}-{secrets.token_hex(3)}"
        for p in (sys.executable, _package_dir()):
            if not _visible_to(self.uid, self.gid, p):
                raise LabkitError(f"{p} cannot be read by an unprivileged user, so a sandboxed kernel cannot "
                                  f"run Python or import labkit from it",
                                  fix="install labkit where every user may read it (chmod o+rx on the path)")
        self.scratch = os.path.join(SCRATCH_ROOT, self.name)
        os.mkdir(self.scratch, 0o700)
        self._made.append(("scratch", self.scratch))
        os.chown(self.scratch, self.uid, self.gid)
        kcg = self.host.cgroup(self.name + "-k", memory=self.kernel_limits["memory"], cpus=self.kernel_limits["cpus"],
                               pids=self.kernel_limits["pids"])
        self._made.append(("cgroup", kcg))
        self.kernel_cgroup = kcg
        if self.kind == "target":
            self.lab = self.target
            self.info = {"sandbox": "target", "target": self.target.target or self.target.transport.describe()}
            return
        acg = self.host.cgroup(self.name + "-a", memory=self.agent_limits["memory"], cpus=self.agent_limits["cpus"],
                               pids=self.agent_limits["pids"])
        self._made.append(("cgroup", acg))
        if self.kind == "vm":
            from ..client.transport import UnixSocket
            from ..wire.protocol import vm_start_line
            got = self.host.call("vm.grading_restore", memory_mb=VM_MEMORY_MB, cgroup=acg.name,
                                 uid=_free_uid(self.slot + VM_UID_OFFSET))
            self._made.append(("vm", got["id"]))
            self.info = {"sandbox": "vm", **{k: got[k] for k in ("accel", "restore_s", "snapshot", "boot_s")}}
            transport = UnixSocket(got["socket"], preamble=vm_start_line())
            self._made.append(("transport", transport))
            self.lab = Lab(transport, f"grading VM {got['id']} ({got['accel'].upper()})")
            return
        self.info = {"sandbox": "container"}
        spec = SandboxSpec(kind="agent", cgroup=acg.name, hide=self.hide)
        transport = Subprocess(launcher() + [json.dumps(spec.to_dict())],
                               name="sandbox", fix="run `labkit doctor`: the sandbox needs namespaces and cgroups")
        self._made.append(("transport", transport))
        self.lab = Lab(transport, f"sandbox {self.name}")

    def close(self):
        """Undo everything, newest first; the first failure is raised after the rest was tried."""
        first = None
        while self._made:
            kind, what = self._made.pop()
            try:
                if kind == "transport":
                    what.close()
                elif kind == "cgroup":
                    what.remove()
                elif kind == "vm":
                    self.host.call("vm.grading_stop", vm_id=what)
                elif kind == "scratch" and os.path.lexists(what):  # (gone already if `labkit cleanup` ran)
                    shutil.rmtree(what)
                elif kind == "fd":
                    os.close(what)
            except Exception as exc:  # noqa: BLE001 - go on undoing; report the first
                first = first or exc
        if first is not None:
            raise first

    def __exit__(self, *exc):
        self.close()

    # -- the kernel -----------------------------------------------------------------------------------
    def kill_kernel(self):
        """Kill every process of the kernel's cgroup (what a dead or stopped kernel left running)."""
        self.kernel_cgroup.kill()

    def kernel_spec(self, argv):
        return SandboxSpec(kind="kernel", cgroup=self.kernel_cgroup.name, argv=argv, uid=self.uid, gid=self.gid,
                           scratch=self.scratch, hide=self.hide)

    def kernel_manager(self, kernel_name="python3"):
        """An AsyncKernelManager (what nbclient drives) whose kernel starts inside this sandbox, over ipc sockets in scratch."""
        from jupyter_client.manager import AsyncKernelManager
        box = self

        class SandboxedKernelManager(AsyncKernelManager):
            def format_kernel_cmd(self, extra_arguments=None):
                argv = super().format_kernel_cmd(extra_arguments)
                return launcher() + [json.dumps(box.kernel_spec(argv).to_dict())]

            def write_connection_file(self, **kw):
                # Written afresh at every (re)start, when no process of the kernel's user is left (the grader
                # kills its cgroup first): whatever that user put at the path (a symlink to a file of root's,
                # say) is removed, never followed, and the new file is handed over through its descriptor.
                path = self.connection_file
                if os.path.lexists(path):
                    os.unlink(path)
                    self._connection_file_written = False
                super().write_connection_file(**kw)
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != 0:
                        raise LabkitError(f"{path} is not the connection file the grader wrote",
                                          fix="grade the submission again")
                    os.fchown(fd, box.uid, box.gid)
                finally:
                    os.close(fd)

        return SandboxedKernelManager(kernel_name=kernel_name, transport="ipc", ip=os.path.join(self.scratch, "zmq"),
                                      connection_file=os.path.join(self.scratch, "kernel.json"), cache_ports=False)
