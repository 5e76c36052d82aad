"""The launcher: a fresh helper process that builds one process's namespaces and root, then execs it.

The agent never changes its own namespaces (it may be a Jupyter kernel): it starts
``python3 -m labkit.agent.launch REPORT SPEC CONTEXT`` and reads back a report. Inside:

    P (launcher, host namespaces)      writes uid/gid maps, collects the record, reports
    └─ C: unshare(CLONE_NEW...)        the namespaces are made here
       └─ G: (fork, PID 1 if CLONE_NEWPID) mounts, sethostname, chroot or pivot_root,
             looks around (the process's own view), then execve(argv)

Without a new PID namespace C and G are the same process; so they are when there is no user
namespace and no network to wire, because then P itself calls unshare(CLONE_NEWPID) and its one child
is PID 1 at once (one fork fewer: a container starts in about crun's time). The mechanisms live in their own modules
(:mod:`~labkit.agent.namespaces`, :mod:`~labkit.agent.chroot`, :mod:`~labkit.agent.rootfs`); every
syscall goes through :mod:`labkit.agent.kernel`, so the report lists them with their arguments. This module owns nothing
after it exits: the agent (:mod:`labkit.agent.process`) records what outlives it.
Standard library only.
"""
import errno
import json
import os
import signal
import sys
import time

from ..wire.errors import LabkitError, MechanismError
from ..wire.specs import RUN_DIR, STATE_DIR, ProcessSpec, rootfs_path
from . import chroot, kernel, namespaces, network, rootfs
from .runner import Recorder, close_sealed_python
from .state import write_json

PR_SET_PDEATHSIG = 1
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _send(fd, obj):
    os.write(fd, (json.dumps(obj) + "\n").encode())


def _child(spec, ctx, msg_w, go_r, detached, pid_ns_made=False, waiter=True):
    """C and then G (or, when P made the PID namespace already, C is G: PID 1). Never returns. Without
    ``waiter`` (a container under the supervisor) C leaves as soon as G is born: G becomes the supervisor's."""
    rec = Recorder("launch")
    code = 126
    try:
        if not detached:
            kernel.libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if ctx.get("cgroup_procs"):
            # into the cgroup before anything else: its limits then hold from the first instruction on,
            # and a new cgroup namespace is rooted there
            _join_own_cgroup(ctx["cgroup_procs"], rec)
        flags = namespaces.clone_flags(n for n in spec.namespaces if not (pid_ns_made and n == "pid"))
        if flags:
            kernel.unshare(flags, rec=rec)
        if "user" in spec.namespaces:
            _send(msg_w, {"stage": "unshared"})
            _wait_go(go_r, b"g", "write the uid/gid maps")
            kernel.setresgid(0, rec=rec)
            kernel.setresuid(0, rec=rec)
            os.setgroups([])
        if spec.network:
            # P wires the new network namespace to the bridge before the program can run
            _send(msg_w, {"stage": "net"})
            _wait_go(go_r, b"n", "connect the network namespace (see the launcher's error)")
        os.close(go_r)
        if "pid" in spec.namespaces and not pid_ns_made:
            g = os.fork()
            if g:
                # C: report G's host PID, then wait for it and pass its exit status on (or leave it to the
                # supervisor, the subreaper that G's parent becomes when C is gone).
                _send(msg_w, {"pid": g, "waiter": os.getpid() if waiter else None})
                os.close(msg_w)
                os._exit(kernel.wait_exit_code(g) if waiter else 0)
            rec.syscall("fork", [], "child is PID 1 of the new PID namespace")
            if not detached:
                kernel.libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        elif not pid_ns_made:
            _send(msg_w, {"pid": os.getpid(), "waiter": None})
        # G from here on.
        _send(msg_w, {"ns": namespaces.inodes()})
        _setup(spec, rec)
        if spec.user:
            uid, _, gid = spec.user.partition(":")
            os.setgroups([])
            kernel.setresgid(int(gid or uid), rec=rec)
            kernel.setresuid(int(uid), rec=rec)
        if spec.cap_keep is not None:
            kernel.drop_capabilities(spec.cap_keep, rec=rec)
        if spec.seccomp_deny:
            kernel.seccomp_deny(spec.seccomp_deny, rec=rec)
        view = namespaces.look_around(ctx) if spec.look else None
        if spec.action == "escape":
            view = chroot.escape(rec, ctx)
        _send(msg_w, {"steps": rec.steps, "view": view})
        if spec.action in ("probe", "escape"):
            os.close(msg_w)
            os._exit(0)
        argv = list(spec.argv) or ["sleep", "2147483647"]
        env = {"PATH": CONTAINER_PATH, "HOME": "/root", "TERM": "xterm", "LANG": "C.UTF-8"}
        if spec.hostname:
            env["HOSTNAME"] = spec.hostname
        env.update(dict(spec.env))
        _send(msg_w, {"exec": argv})
        kernel.clean_for_exec(keep=msg_w)  # (the report pipe stays for a failed exec's error)
        if spec.tty:  # -t: a terminal of the container's own, its master to the supervisor (stdin is its socket)
            kernel.console_here(0)
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            # Docker's codes: 127 the program is not there, 126 it is there but cannot be run
            code = 127 if exc.errno == errno.ENOENT else 126
            raise MechanismError(f"execve({argv[0]!r}) failed: {exc.strerror}",
                                 fix="check that the program exists in the process's root "
                                     "(the busybox rootfs has /bin/sh, ls, cat, hostname, ps, ...)"
                                 if code == 127 else f"{argv[0]} is not a program this kernel can run "
                                 "(a directory, a file without x permission, or another CPU's binary)",
                                 exit_code=code) from None
    except BaseException as exc:  # report every failure to P, never raise past a fork
        err = exc.to_wire() if isinstance(exc, LabkitError) else {
            "type": "MechanismError", "message": f"{type(exc).__name__}: {exc}", "fix": ""}
        try:
            _send(msg_w, {"steps": rec.steps, "error": err})
        except OSError:
            pass
        os._exit(code)


def _wait_go(go_r, expected, what):
    if os.read(go_r, 1) != expected:
        raise MechanismError(f"the launcher did not {what}")


def _join_own_cgroup(files, rec):
    """This (single-threaded) process joins its cgroup, one hierarchy at a time. Under cgroup v1 it writes 0
    ("myself") to the group's ``tasks`` file: the kernel moves one thread that cannot exit or exec meanwhile
    without taking its global threadgroup lock, whose first writer waits for an RCU grace period (5 to 15 ms
    here, more on a busy machine). Writing a PID to ``cgroup.procs`` (cgroup v2 has nothing else for a
    process) always takes that lock: moving the whole thread group of another process must stop it from
    forking meanwhile."""
    for procs in files:
        tasks = os.path.join(os.path.dirname(procs), "tasks")
        target = tasks if os.path.exists(tasks) else procs
        with open(target, "w") as f:
            f.write("0")
        rec.file("write", target, "'0' (this process)")


def _join_cgroup(pid, files, rec):
    for procs in files:
        with open(procs, "w") as f:
            f.write(str(pid))
        rec.file("write", procs, repr(str(pid)))


def _setup(spec, rec):
    """Mounts, hostname, loopback and the root switch, in the namespaces already made."""
    if "mnt" in spec.namespaces:
        kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE, rec=rec)
    if spec.hostname:
        kernel.sethostname(spec.hostname, rec=rec)
    if "net" in spec.namespaces:
        kernel.link_up("lo", rec=rec)
    if spec.rootfs is None:
        if spec.wants_proc and "mnt" in spec.namespaces:
            kernel.mount("proc", "/proc", "proc", kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC, rec=rec)
        kernel.chdir(spec.cwd, rec=rec)
        return
    chroot.enter_root(spec, rec)


def launch(spec, ctx, detached, waiter=True):
    """P: fork C, write maps, collect the record. Returns (report dict, child pid of C)."""
    msg_r, msg_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    rec = Recorder("launch")
    # Fast path: without a user namespace and a network to wire, P itself asks for the new PID namespace,
    # so its one child is PID 1 at once (no waiter in between). With either, P must stay where it is:
    # its helpers (ip, the uid maps) would otherwise be born inside the container's PID namespace.
    pid_ns_made = "pid" in spec.namespaces and "user" not in spec.namespaces and not spec.network
    if pid_ns_made:
        kernel.unshare(kernel.CLONE_NEWPID, rec=rec)
    c = os.fork()
    if c == 0:
        os.close(msg_r)
        os.close(go_w)
        _child(spec, ctx, msg_w, go_r, detached, pid_ns_made, waiter)
    os.close(msg_w)
    os.close(go_r)
    if pid_ns_made:
        rec.syscall("fork", [], f"{c}: PID 1 of the new PID namespace")
    report = {"steps": [], "pid": c if pid_ns_made else None, "waiter": None, "ns": {}, "view": None,
              "error": None, "exec": None}
    try:
        with os.fdopen(msg_r, "r") as msgs:
            for line in msgs:
                msg = json.loads(line)
                if msg.get("stage") == "unshared":
                    namespaces.write_id_maps(c, spec, rec)
                    os.write(go_w, b"g")
                    continue
                if msg.get("stage") == "net":
                    try:
                        res = network.connect(spec.network, c, ctx["owner"], spec.ports, spec.ip)
                        rec.steps += res["steps"]
                        report["net"] = {"network": spec.network, "ip": res["ip"], "owner": ctx["owner"],
                                         "ports": res["facts"]["ports"], "gateway": res["facts"]["gateway"]}
                        os.write(go_w, b"n")
                    except LabkitError as exc:
                        report["net_error"] = exc.to_wire()
                        os.write(go_w, b"x")
                    continue
                if msg.get("waiter") and ctx.get("cgroup_home"):
                    # C only waits for PID 1 of the new namespace: it leaves the group, so that it
                    # neither counts against the limits nor meets the OOM killer there
                    _join_cgroup(msg["waiter"], ctx["cgroup_home"], rec)
                for key in ("pid", "waiter", "ns", "view", "error", "exec"):
                    if key in msg:
                        report[key] = msg[key]
                if "steps" in msg:
                    report["steps"] = rec.steps + msg["steps"]
    finally:
        os.close(go_w)
    if report.get("net_error"):
        report["error"] = report["net_error"]  # the cause, not the child's "the launcher did not connect"
    if not report["steps"]:
        report["steps"] = rec.steps
    return report, c


def undo_host_mounts(mounts):
    """Unmount what a launcher mounted on the host (a rootfs's /proc). The list may come from a state file:
    only mount points strictly below labkit's own directories are touched."""
    rec = Recorder("undo host mounts")
    for target in reversed(mounts if isinstance(mounts, list) else []):
        if not isinstance(target, str) or not any(target.startswith(d + "/") and "/../" not in target + "/"
                                                  for d in (STATE_DIR, RUN_DIR)):
            continue
        try:
            kernel.umount2(target, kernel.MNT_DETACH | kernel.UMOUNT_NOFOLLOW, rec=rec)
        except MechanismError:
            pass
    return rec.steps


def main(argv=None):
    close_sealed_python()
    argv = sys.argv[1:] if argv is None else argv
    report_path, spec_json, ctx_json, mode = argv[:4]
    spec = ProcessSpec.from_dict(json.loads(spec_json))
    ctx = json.loads(ctx_json)
    # "run" and "attach" stay the parent until the end; "start" leaves a waiter behind; "supervised" (a container
    # forked by the supervisor) leaves nothing: the container's PID 1 becomes the supervisor's child
    detached = mode in ("start", "supervised")
    started = time.perf_counter()
    host_rec = Recorder("host mounts")
    host_mounts = []
    if spec.rootfs is not None and "mnt" not in spec.namespaces and spec.wants_proc:
        # No private mount namespace: this mount is visible on the host until we undo it.
        target = rootfs.place_in_root(rootfs_path(spec.rootfs), "/proc")
        kernel.mount("proc", target, "proc", kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC, rec=host_rec)
        host_mounts.append(target)
    try:
        report, c = launch(spec, ctx, detached, waiter=mode != "supervised")
    except BaseException:
        undo_host_mounts(host_mounts)
        raise
    report["steps"] = host_rec.steps + report["steps"]
    report["host_mounts"] = host_mounts
    if mode == "attach":
        report["monitor"] = os.getpid()
        _write_json(report_path, dict(report, exit_code=None, running=report["error"] is None))
        report_path = ctx["exit_path"]
    exit_code = None
    if not detached or report["error"] is not None:
        _, status = os.waitpid(c, 0)
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code < 0:  # killed by a signal: report it the way a shell does (SIGKILL -> 137)
            report["signal"] = signal.Signals(-exit_code).name
            exit_code = 128 - exit_code
    report["exit_code"] = exit_code
    if report.get("net") and (exit_code is not None or report["error"] is not None):
        report["steps"] += network.disconnect(spec.network, ctx["owner"])["steps"]  # the run is over
    if spec.action == "escape":
        chroot.remove_escape_dir(spec)
    if exit_code is not None and host_mounts:
        report["steps"] += undo_host_mounts(host_mounts)
        report["host_mounts"] = []
    report["launch_duration"] = time.perf_counter() - started
    report["finished"] = time.time()
    _write_json(report_path, report)
    return 0 if exit_code is None else exit_code


def _write_json(path, obj):
    write_json(path, obj)  # a unique O_EXCL temp in the same private directory, then rename


if __name__ == "__main__":
    sys.exit(main())
