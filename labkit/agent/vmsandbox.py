"""The grading VM: a disposable agent in a qemu guest of its own, booted once and restored per submission.

Root in a submission's agent may do anything to its kernel; here that kernel is a guest's, so nothing it does
reaches the grading host or another submission, and everything it made is gone when its qemu is killed.

- :func:`snapshot` builds the guest's root (:func:`labkit.agent.initramfs.build_agent_initramfs`: this target's
  Python, tools and kernel modules, labkit's agent; no disk), boots it (KVM when :func:`labkit.agent.vm.accel`
  finds it usable, TCG otherwise, and says which), waits until :func:`guest_main` has imported the whole agent
  and says :data:`~labkit.agent.initramfs.AGENT_READY`, then stops the guest and saves its whole state: QMP
  ``migrate`` to a file handed over as a descriptor. The snapshot lives in ``/var/lib/labkit/vms/grade/<key>``
  (key: the kernel, the guest's root, qemu's version, the memory, the accelerator); graders share it under a
  lock, and a change of any of those makes a new one in place of the old. Like an image it is a file on disk,
  not a live object: ``labkit cleanup`` leaves it (``rm -rf /var/lib/labkit/vms/grade`` frees its 200 MB).
- :func:`restore` starts a new qemu that takes the saved state in (``-incoming fd:N``), continues it over QMP
  and returns the unix socket behind which the guest's agent waits on a virtio-serial port. A restored guest is
  a recorded state entry of :mod:`labkit.agent.vm`, so ``vm.stop`` and ``labkit cleanup`` kill it by pid.
- :func:`guest_main` is the guest's side: it imports every agent module, opens the port, says ready, waits
  for the grader to connect, reads the grader's first line (:func:`labkit.wire.protocol.vm_start_line`: the
  real time and fresh random bytes, or every restored guest would share the snapshot's clock and random
  state), serves the protocol until the grader goes and powers the guest off.

Standard library only.
"""
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import time

from ..wire import protocol
from ..wire.errors import CommandTimeout, InvalidSpec, MechanismError, NotFound
from ..wire.specs import STATE_DIR
from . import cgroups, initramfs, vm
from .runner import pid_fields, read_text, run, start, which
from .state import private_dir, write_json

SNAPSHOTS = STATE_DIR + "/vms/grade"
#: the virtio-serial port's name
PORT_NAME = "labkit.agent"
#: the guest's memory (MiB): room for the labs' images and containers; the snapshot holds the pages in use only
MEMORY_MB = 1024
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): reseed the kernel's random generator from its input pool


def _argv(vm_id, d, snap_dir, mode, memory_mb, serial):
    """qemu's command line: the same devices for the boot that saves and every restore (only the name, the
    sockets' directory and the serial console's end differ), or the saved state would not fit."""
    qemu_name, mach_args, console = vm.QEMU[os.uname().machine]
    qemu = which(qemu_name)
    if not qemu:
        raise NotFound(f"{qemu_name} is not installed", fix="`sudo apt-get install qemu-system-x86` (qemu-system-arm on arm64)")
    return [qemu, *mach_args, "-machine", "mem-merge=off",  # no page sharing between guests (a timing channel)
            "-name", f"labkit-vm-{vm_id}", "-accel", mode, "-m", str(memory_mb), "-smp", "1",
            "-nographic", "-nodefaults", "-no-reboot", "-serial", serial, "-monitor", "none",
            "-qmp", f"unix:{d}/qmp.sock,server=on,wait=off",
            "-kernel", f"{snap_dir}/vmlinuz", "-initrd", f"{snap_dir}/initrd.gz",
            "-append", f"console={console} quiet loglevel=1 panic=-1 rdinit=/init",
            "-device", "virtio-serial-pci,id=vs0",
            "-chardev", f"socket,id=agent,path={d}/agent.sock,server=on,wait=off",
            "-device", f"virtserialport,bus=vs0.0,chardev=agent,name={PORT_NAME}"]


class _QMP:
    """A QMP client on qemu's unix socket: commands in, answers out (events skipped)."""

    def __init__(self, path, proc, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise MechanismError(f"qemu's QMP socket {path} did not open (qemu exit code {proc.poll()})",
                                         fix="run `labkit doctor`; the VM's qemu.log says why") from None
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
        self._read()  # the greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise MechanismError("qemu closed its QMP socket", fix="the VM's qemu.log says why")
        return json.loads(line)

    def cmd(self, name, fds=(), **args):
        msg = (json.dumps({"execute": name, "arguments": args}) + "\n").encode()
        if fds:
            socket.send_fds(self.sock, [msg], list(fds))
        else:
            self.sock.sendall(msg)
        while True:
            answer = self._read()
            if "error" in answer:
                raise MechanismError(f"qemu refused {name}: {answer['error'].get('desc')}", fix="see qemu.log")
            if "return" in answer:
                return answer["return"]

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def _wait_status(qmp, proc, want, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        status = qmp.cmd("query-status")["status"]
        if status in want:
            return status
        if proc.poll() is not None or time.monotonic() > deadline:
            raise CommandTimeout(f"the grading VM did not {what} within {timeout} s (status {status})",
                                 fix="run `labkit cleanup` and grade again; `labkit doctor` checks qemu")
        time.sleep(0.01)


def _qemu_version(qemu):
    return run([qemu, "--version"], timeout=30).stdout.splitlines()[0]


_MEMO = {}


def snapshot(memory_mb=MEMORY_MB, accel_mode=None, timeout=600):
    """The saved, agent-ready grading guest ({'dir', 'accel', 'accel_reason', 'boot_s', 'save_s', 'bytes', ...}),
    made when there is none for this kernel, root, qemu, memory and accelerator (a boot: about 20 s under TCG)."""
    if not isinstance(memory_mb, int) or not 256 <= memory_mb <= 16384:
        raise InvalidSpec(f"memory_mb={memory_mb!r} must be 256..16384", fix="e.g. 1024")
    gone = vm.missing()
    if gone:
        raise NotFound(f"no grading VM here: {gone['reason']}",
                       fix=gone["fix"] + "; or, for a class you trust, grade with --sandbox container")
    mode, why = (accel_mode, "asked for") if accel_mode else vm.accel()
    kernel = vm.find_kernel()
    private_dir(SNAPSHOTS)
    lock = os.open(f"{SNAPSHOTS}/.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in snapshots():  # builds happen under this lock only: one seen now was killed half-way
            if stale.startswith(".build-"):
                shutil.rmtree(f"{SNAPSHOTS}/{stale}", ignore_errors=True)
        tmp = f"{SNAPSHOTS}/.build-{os.getpid()}-{secrets.token_hex(3)}"
        os.mkdir(tmp, 0o700)
        try:
            package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            notes = initramfs.build_agent_initramfs(f"{tmp}/initrd.gz", kernel, package)
            h = hashlib.sha256()
            with open(f"{tmp}/initrd.gz", "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
            with open(kernel, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
            qemu = _argv("0", "", "", mode, memory_mb, "null")[0]
            h.update(json.dumps([_qemu_version(qemu), memory_mb, mode, _argv("0", "D", "S", mode, memory_mb, "null")]).encode())
            key = h.hexdigest()[:20]
            d = f"{SNAPSHOTS}/{key}"
            meta = _read_meta(d)
            if meta is None:
                shutil.rmtree(d, ignore_errors=True)
                shutil.copyfile(kernel, f"{tmp}/vmlinuz")
                meta = _boot_and_save(tmp, mode, memory_mb, timeout)
                meta.update(key=key, accel=mode, accel_reason=why, kernel_image=kernel, memory_mb=memory_mb,
                            initramfs_notes=notes, made=time.time())
                write_json(f"{tmp}/meta.json", meta)
                os.rename(tmp, d)
                for old in snapshots():  # one snapshot at a time: the ones before were made of older files
                    if old != key and not old.startswith("."):
                        shutil.rmtree(f"{SNAPSHOTS}/{old}", ignore_errors=True)
            meta["dir"] = d
            return meta
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(lock)


def _read_meta(d):
    try:
        with open(f"{d}/meta.json") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not all(os.path.isfile(f"{d}/{n}") for n in ("state", "initrd.gz", "vmlinuz")):
        return None
    return meta if isinstance(meta, dict) else None


def _boot_and_save(snap_dir, mode, memory_mb, timeout):
    """Boot the guest in ``snap_dir`` until its agent is ready, then save it there as ``state``."""
    vm_id, proc = secrets.token_hex(4), None
    d = _vm_dir(vm_id)
    qmp = None
    try:
        t0 = time.perf_counter()
        proc = start(_argv(vm_id, d, snap_dir, mode, memory_mb, "stdio"), stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, new_session=False)
        _record(vm_id, d, proc.pid)
        console = _read_console(proc, initramfs.AGENT_READY, timeout, mode)
        boot_s = time.perf_counter() - t0
        qmp = _QMP(f"{d}/qmp.sock", proc)
        qmp.cmd("stop")
        t1 = time.perf_counter()
        fd = os.open(f"{snap_dir}/state", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            qmp.cmd("getfd", fds=[fd], fdname="state")
        finally:
            os.close(fd)
        qmp.cmd("migrate", uri="fd:state")
        deadline = time.monotonic() + timeout
        while True:
            st = qmp.cmd("query-migrate").get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled") or time.monotonic() > deadline:
                raise MechanismError(f"saving the grading VM ended {st}", fix="see qemu's output; try again")
            time.sleep(0.02)
        save_s = time.perf_counter() - t1
        qmp.cmd("quit")
        proc.wait(timeout=30)
        return {"boot_s": round(boot_s, 2), "save_s": round(save_s, 2), "bytes": os.path.getsize(f"{snap_dir}/state"),
                "console": console[-20:]}
    finally:
        if qmp is not None:
            qmp.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        vm._remove({"id": vm_id, "dir": d}, vm.Recorder("grading VM"))


def _read_console(proc, marker, timeout, mode):
    deadline, buf, lines = time.monotonic() + timeout, b"", []
    fd = proc.stdout.fileno()
    while True:
        if time.monotonic() > deadline:
            raise CommandTimeout(f"the grading VM did not get ready within {timeout} s ({mode.upper()})",
                                 fix="console tail:\n" + "\n".join(lines[-15:]))
        r, _, _ = select.select([fd], [], [], 0.5)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise MechanismError("the grading VM stopped while booting; console tail:\n" + "\n".join(lines[-15:]),
                                 fix="run `labkit doctor`")
        buf += chunk
        *done, buf = buf.split(b"\n")
        for raw in done:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            lines.append(line)
            if marker in line:
                return lines


def _vm_dir(vm_id):
    private_dir(vm.VM_RUN)
    d = f"{vm.VM_RUN}/{vm_id}"
    os.mkdir(d, 0o700)
    return d


def _record(vm_id, d, pid):
    """The state entry :mod:`labkit.agent.vm` undoes (its qemu by pid, name and start time; its directory)."""
    write_json(f"{vm.VM_RUN}/{vm_id}.json", {"id": vm_id, "network": None, "tap": None, "disk": None, "dir": d,
                                              "grading": True, **pid_fields(pid)})


#: how a restored guest's qemu is confined: seccomp without obsolete calls, new processes or resource changes
#: (set-user-ID calls stay allowed for ``-runas``, which drops root after the filter is in; as that user there is
#: nothing to elevate to)
QEMU_SECCOMP = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
#: the most a restored qemu may write to its log (root in the guest can make qemu complain on purpose)
LOG_LIMIT = 16 << 20
#: joins the cgroups named before ``--`` (one cgroup.procs file per hierarchy), then executes what follows:
#: qemu is held by its limits from its first instruction, and removing the cgroup kills it even before it
#: has a state entry
JOIN_AND_EXEC = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def restore(uid, memory_mb=MEMORY_MB, accel_mode=None, cgroup=None, timeout=120):
    """A new grading guest from the snapshot: {'id', 'socket', 'restore_s', 'accel', ...}. Connect to ``socket``
    (a unix socket, root's alone), send :func:`labkit.wire.protocol.vm_start_line`, then speak the protocol;
    :func:`stop` ends it.

    Its qemu is what root in the guest would attack to get out, so it runs with the least: in labkit cgroup
    ``cgroup`` from its start (memory, CPU and pids limits), in a network namespace of its own with nothing in
    it, under :data:`QEMU_SECCOMP`, chrooted into an empty directory and as ``uid`` (and that gid: a user id
    no account and no other sandbox has) once it has opened its files, with at most :data:`LOG_LIMIT` bytes
    of log."""
    if not isinstance(uid, int) or isinstance(uid, bool) or not 1000 <= uid < 2 ** 31:
        raise InvalidSpec(f"uid={uid!r} must be an unprivileged user id", fix="pass one no account has")
    snap = _MEMO.get((memory_mb, accel_mode))
    if snap is None or _read_meta(snap["dir"]) is None:
        snap = _MEMO[(memory_mb, accel_mode)] = snapshot(memory_mb, accel_mode)
    vm_id = secrets.token_hex(4)
    d = _vm_dir(vm_id)
    os.mkdir(f"{d}/root", 0o555)  # qemu's chroot: empty
    proc = qmp = None
    t0 = time.perf_counter()
    lock = os.open(f"{SNAPSHOTS}/.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)  # no new snapshot replaces this one while qemu reads it
        if _read_meta(snap["dir"]) is None:
            raise MechanismError("the grading VM's snapshot was replaced meanwhile", fix="grade the submission again")
        fd = os.open(f"{snap['dir']}/state", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with open(f"{d}/qemu.log", "wb") as log:
                qemu = _argv(vm_id, d, snap["dir"], snap["accel"], memory_mb, "null") + [
                    "-incoming", f"fd:{fd}", "-sandbox", QEMU_SECCOMP, "-chroot", f"{d}/root", "-runas", f"{uid}:{uid}"]
                procs = cgroups.procs_files(cgroup) if cgroup else []
                argv = ["sh", "-c", JOIN_AND_EXEC, "labkit-qemu", *procs, "--", "unshare", "--net", "--",
                        "prlimit", f"--fsize={LOG_LIMIT}", "--", *qemu]
                proc = start(argv, stdout=log, stderr=log, pass_fds=(fd,))
        finally:
            os.close(fd)
        _record(vm_id, d, proc.pid)
        qmp = _QMP(f"{d}/qmp.sock", proc)
        if _wait_status(qmp, proc, ("paused", "running", "postmigrate"), timeout, "take its state in") != "running":
            qmp.cmd("cont")
        restore_s = time.perf_counter() - t0
    except BaseException as exc:
        code = proc.poll() if proc is not None else None
        if proc is not None and code is None:
            proc.kill()
        log = (read_text(f"{d}/qemu.log") or "").strip()
        vm._remove({"id": vm_id, "dir": d, **(pid_fields(proc.pid) if proc else {})}, vm.Recorder("grading VM"))
        if proc is not None:
            proc.wait()
        if isinstance(exc, (OSError, MechanismError, CommandTimeout)) and (code is not None or log):
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise MechanismError(f"the grading VM did not start (qemu: {how}): {log[-2000:] or 'no output'}",
                                 fix="run `labkit doctor`; `rm -rf " + SNAPSHOTS + "` makes a new snapshot") from None
        raise
    finally:
        os.close(lock)
        if qmp is not None:
            qmp.close()
    _LIVE[vm_id] = proc
    return {"id": vm_id, "socket": f"{d}/agent.sock", "restore_s": round(restore_s, 3), "accel": snap["accel"],
            "accel_reason": snap["accel_reason"], "snapshot": snap["key"], "boot_s": snap["boot_s"],
            "snapshot_bytes": snap["bytes"], "memory_mb": memory_mb}


#: the restored guests' qemu processes this agent started (reaped by :func:`stop`)
_LIVE = {}


def stop(vm_id):
    """Kill a restored guest and remove its entry (what ``vm.stop`` does, and the zombie reaped)."""
    if not isinstance(vm_id, str) or not re.fullmatch(r"[0-9a-f]{8}", vm_id):
        raise InvalidSpec(f"vm id {vm_id!r} is not one", fix="pass the id restore() returned")
    for state in vm.list_vms():
        if state["id"] == vm_id:
            vm._remove(state, vm.Recorder("stop grading VM"))
    proc = _LIVE.pop(vm_id, None)
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return {"id": vm_id, "stopped": True}


def snapshots():
    """The names of the saved snapshots (one, normally) and of unfinished ones (``.build-*``)."""
    if not os.path.isdir(SNAPSHOTS):
        return []
    return sorted(n for n in os.listdir(SNAPSHOTS) if re.fullmatch(r"[0-9a-f]{20}", n) or n.startswith(".build-"))


# -- the guest's side --------------------------------------------------------------------------------------------------
def _port():
    for name in sorted(os.listdir("/sys/class/virtio-ports")):
        if (read_text(f"/sys/class/virtio-ports/{name}/name") or "").strip() == PORT_NAME:
            return f"/dev/{name}"
    raise NotFound(f"no virtio-serial port {PORT_NAME} in this guest", fix="boot it through labkit.agent.vmsandbox")


def guest_main():
    """PID 1's program in the grading guest: serve one grader, then power off (never returns normally)."""
    import importlib
    import pkgutil
    import random
    from . import __path__ as agent_path
    from .server import serve
    for m in pkgutil.iter_modules(agent_path):  # everything imported now is imported in the snapshot
        if m.name not in ("__main__",):
            importlib.import_module(f"labkit.agent.{m.name}")
    vm.IN_GRADING_VM = True
    fd = os.open(_port(), os.O_RDWR | os.O_CLOEXEC)
    print(initramfs.AGENT_READY, flush=True)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while any(ev & select.POLLHUP for _, ev in poller.poll(0)):  # no grader connected yet: wait for one
        time.sleep(0.02)
    line = b""
    while not line.endswith(b"\n") and len(line) < 256:
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    parts = line.decode("ascii", "replace").split()
    if len(parts) == 3 and parts[0] == protocol.VM_START:
        time.clock_settime(time.CLOCK_REALTIME, int(parts[1]) / 1e9)
        seed = bytes.fromhex(parts[2])
        with open("/dev/urandom", "wb") as f:
            f.write(seed)
            f.flush()
            fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
        random.seed(seed)
    try:
        serve(os.fdopen(fd, "rb", buffering=0), os.fdopen(os.dup(fd), "wb", buffering=0))
    finally:
        os.sync()
        run(["poweroff", "-f"], timeout=30, check=False)
    return 0


if __name__ == "__main__" and len(sys.argv) > 1:
    print(json.dumps(snapshot(), indent=1))
