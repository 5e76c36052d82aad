"""The VM baseline: a real virtual machine booted with qemu, running the same busybox as the containers.

A :class:`VM` boots the target's own ``/boot`` kernel under qemu with the initramfs of
:mod:`labkit.agent.initramfs` (the target's static busybox, the virtio drivers of that kernel, labkit's probe
and workload scripts) -- KVM only when a bounded full-boot probe passes, TCG otherwise, and every result says
which -- and then takes commands over its serial console, one at a time (``exec``), until ``stop``. Optional:
a virtio disk (an ext4 image on the host's disk, mounted at /mnt) and a virtio NIC on a tap device on
a labkit bridge network. ``boot(command)`` is one VM, one command; ``footprint()`` is qemu's memory as the host
sees it and the guest's own view; ``missing()`` and ``accel()`` say whether and how a VM can boot here.
A live VM is a recorded state entry (``/run/labkit/vms/<id>.json``): ``cleanup()`` kills its qemu, removes its
tap and its disk. Standard library only.
"""
import base64
import os
import re
import secrets
import shutil
import signal
import subprocess
import time

from ..wire.errors import CommandTimeout, InvalidSpec, LabkitError, MechanismError, NotFound
from ..wire.specs import RUN_DIR, STATE_DIR
from . import doctor, initramfs, network, rootfs
from .runner import Recorder, pid_fields, read_text, recorded_process, run, start, wait_gone, which
from .state import private_dir, read_dir, write_json

VM_RUN = RUN_DIR + "/vms"
VM_DISKS = STATE_DIR + "/vms"
QEMU = {"x86_64": ("qemu-system-x86_64", ["-M", "q35"], "ttyS0"),
        "aarch64": ("qemu-system-aarch64", ["-M", "virt", "-cpu", "max"], "ttyAMA0")}


#: set by :func:`labkit.agent.vmsandbox.guest_main`: this agent serves a submission inside the grading VM
IN_GRADING_VM = False


def missing():
    """Why this target cannot boot the VM baseline ({'reason', 'fix'}), or None when it can: a supported CPU,
    qemu for it, a distro kernel in /boot and a static busybox. Cheap: nothing is booted."""
    if IN_GRADING_VM:
        return {"reason": "this agent runs inside labkit's grading VM, which boots no VM of its own (a VM in it "
                          "would be emulated twice over)",
                "fix": "grade the notebooks whose questions boot a VM with --sandbox container (a class you trust) "
                       "or --sandbox target"}
    machine = os.uname().machine
    if machine not in QEMU:
        return {"reason": f"no VM baseline for {machine}", "fix": "use an x86_64 or aarch64 target"}
    if not which(QEMU[machine][0]):
        return {"reason": f"{QEMU[machine][0]} is not installed",
                "fix": "`sudo apt-get install " + ("qemu-system-arm" if machine == "aarch64" else "qemu-system-x86")
                       + "` (scripts/setup.sh and vagrant/provision.sh do)"}
    if doctor.boot_kernel() is None:
        return {"reason": "no readable kernel in /boot for the VM baseline", "fix": doctor.KERNEL_FIX}
    if rootfs.find_static_busybox() is None:
        return {"reason": "no static busybox for the VM's initramfs", "fix": "`sudo apt-get install busybox-static`"}
    return None


def find_kernel():
    """The target's own /boot kernel (:func:`labkit.agent.doctor.boot_kernel`), else a clear error."""
    path = doctor.boot_kernel()
    if path is None:
        raise NotFound("no readable kernel in /boot for the VM baseline", fix=doctor.KERNEL_FIX)
    return path


PROBE_CACHE = doctor.VM_PROBE_CACHE


def accel(probe_timeout=20):
    """('kvm', reason) when a real guest boots under KVM within ``probe_timeout`` s, else ('tcg', reason).

    The doctor's boot-sector probe comes first (cheap); when it passes, a full boot of this VM is tried
    under KVM with a time limit, because nested KVM can run a boot sector and still hang a kernel.
    The answer is cached until the target reboots. ('none', reason) when no VM can boot here at all."""
    gone = missing()
    if gone:
        return "none", gone["reason"]
    probe = doctor.probe_kvm()
    if not probe.get("usable"):
        return "tcg", probe.get("reason", "KVM is not usable")
    cached = doctor.read_boot_cache(PROBE_CACHE)
    if cached and "mode" in cached and "reason" in cached:
        return cached["mode"], cached["reason"]
    try:
        r = boot("true", accel_mode="kvm", timeout=probe_timeout)
        mode, reason = "kvm", f"a KVM guest booted to ready in {r['facts']['boot_to_ready_s']:.2f} s"
    except (CommandTimeout, MechanismError) as exc:
        mode, reason = "tcg", (f"a KVM guest did not boot within {probe_timeout} s: "
                               f"using TCG, slower but correct ({exc.message.splitlines()[0]})")
    doctor.write_boot_cache(PROBE_CACHE, {"mode": mode, "reason": reason})
    return mode, reason


def _status_kb(pid, key):
    for line in (read_text(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def pss_kb(pid):
    """Proportional set size of a process (shared pages divided among their users), in KiB."""
    for line in (read_text(f"/proc/{pid}/smaps_rollup") or "").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


class VM:
    """A live VM: ``start()`` boots it and waits until it takes commands, ``exec()`` runs one, ``stop()`` ends it."""

    def __init__(self, memory_mb=256, cpus=1, accel_mode=None, network_name=None, disk_mb=0, boot_timeout=120,
                 machine=None, kernel=None, busybox=None, modules_root="/"):
        """``machine``/``kernel``/``busybox``/``modules_root``: a guest of another architecture than the
        target's (the tests boot an aarch64 guest on x86_64 under TCG); by default the target's own."""
        if not isinstance(memory_mb, int) or not 64 <= memory_mb <= 16384:
            raise InvalidSpec(f"memory_mb={memory_mb!r} must be a whole number of MiB from 64 to 16384",
                              fix="e.g. memory_mb=256")
        if not isinstance(cpus, int) or not 1 <= cpus <= (os.cpu_count() or 1):
            raise InvalidSpec(f"cpus={cpus!r} must be 1..{os.cpu_count()}", fix="e.g. cpus=1")
        if accel_mode not in (None, "kvm", "tcg"):
            raise InvalidSpec(f"accel={accel_mode!r} must be 'kvm', 'tcg' or None (probe)", fix="leave it unset")
        self.id = secrets.token_hex(4)
        self.memory_mb, self.cpus, self.network_name, self.disk_mb = memory_mb, cpus, network_name, int(disk_mb or 0)
        self.accel_mode, self.boot_timeout = accel_mode, boot_timeout
        self.rec = Recorder(f"VM {self.id}")
        self.proc = None
        self.net = None
        self.dir = f"{VM_RUN}/{self.id}"
        self.disk = f"{VM_DISKS}/{self.id}.img" if self.disk_mb else None
        self._buf = b""
        self.console = []
        self.machine = machine or os.uname().machine
        self.kernel, self.busybox, self.modules_root = kernel, busybox, modules_root
        if self.machine != os.uname().machine and accel_mode != "tcg":
            raise InvalidSpec(f"a {self.machine} guest on a {os.uname().machine} target can only be emulated",
                              fix="pass accel='tcg'")

    # -- life cycle ------------------------------------------------------------------------------
    def start(self):
        machine = self.machine
        if machine not in QEMU:
            raise MechanismError(f"no VM baseline for {machine}", fix="use an x86_64 or aarch64 target")
        qemu_name, mach_args, console = QEMU[machine]
        qemu = which(qemu_name)
        if not qemu:
            raise NotFound(f"{qemu_name} is not installed",
                           fix="`sudo apt-get install qemu-system-x86` (qemu-system-arm on arm64)")
        kernel = self.kernel or find_kernel()
        mode, why = (self.accel_mode, "asked for") if self.accel_mode else accel()
        self.mode = mode
        if mode == "kvm" and machine == "aarch64":
            mach_args = ["-M", "virt", "-cpu", "host"]  # KVM runs the host's own CPU model
        self.rec.what = f"boot a VM ({mode.upper()})"
        self.rec.fact("accel", mode)
        self.rec.fact("accel_reason", why)
        self.rec.fact("kernel_image", kernel)
        self.rec.fact("machine", machine)
        private_dir(VM_RUN)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._save()
        try:
            notes = initramfs.build_initramfs(f"{self.dir}/initrd.gz", kernel, self.busybox, self.modules_root)
            self.rec.fact("initramfs_notes", notes)
            extra = ""
            argv = [qemu, *mach_args, "-name", f"labkit-vm-{self.id}", "-accel", mode, "-m", str(self.memory_mb),
                    "-smp", str(self.cpus), "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
                    "-monitor", "none", "-kernel", kernel, "-initrd", f"{self.dir}/initrd.gz"]
            if self.disk:
                private_dir(VM_DISKS)
                with open(self.disk, "wb") as f:
                    f.truncate(self.disk_mb << 20)
                mkfs = which("mkfs.ext4")
                if not mkfs:
                    raise NotFound("mkfs.ext4 is not installed (for the VM's disk)",
                                   fix="`sudo apt-get install e2fsprogs`")
                self.rec.run([mkfs, "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.disk])
                argv += ["-drive", f"file={self.disk},format=raw,if=virtio"]
                extra += " labkit.disk=1"
            if self.network_name:
                self.net = network.attach_tap(self.network_name, f"vm-{self.id}")
                self._save()
                mac = "52:54:00:" + ":".join(self.id[i:i + 2] for i in (0, 2, 4))
                argv += ["-netdev", f"tap,id=n0,ifname={self.net['tap']},script=no,downscript=no",
                         "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
                extra += f" labkit.ip={self.net['ip']}/{self.net['prefix']} labkit.gw={self.net['gateway']}"
            argv += ["-append", f"console={console} quiet loglevel=1 panic=-1 rdinit=/init{extra}"]
            self.t0 = time.perf_counter()
            self.proc = start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              new_session=False, recorder=self.rec)
            self._save(self.proc.pid)
            os.set_blocking(self.proc.stdout.fileno(), False)
            self._read_until(initramfs.READY, self.boot_timeout, "boot to its first instruction")
            self.rec.fact("boot_to_ready_s", time.perf_counter() - self.t0)
            self._read_until(initramfs.UP, self.boot_timeout, "load its drivers and come up")
            self.rec.fact("boot_to_up_s", time.perf_counter() - self.t0)
            self.rec.fact("kernel", self.exec("uname -r", timeout=30)["stdout"].strip())
            self.rec.fact("host_kernel", os.uname().release)
            if self.net:
                self.rec.fact("ip", self.net["ip"])
        except BaseException:
            self.stop()
            raise
        _LIVE[self.id] = self
        return self

    def _state(self, pid=None):
        """The recorded state entry: what cleanup needs to undo this VM."""
        return {"id": self.id, "network": self.network_name, "tap": self.net and self.net["tap"],
                "disk": self.disk, "dir": self.dir, **pid_fields(pid)}

    def _save(self, pid=None):
        write_json(f"{VM_RUN}/{self.id}.json", self._state(pid))

    def _read_until(self, marker, timeout, what):
        deadline = time.monotonic() + timeout
        out = []
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                line = raw.decode("utf-8", "replace").rstrip("\r")
                self.console.append(line)
                if marker in line:
                    return out, line
                out.append(line)
            if time.monotonic() > deadline:
                raise CommandTimeout(f"the VM did not {what} within {timeout} s ({self.mode.upper()})",
                                     fix="give it longer (TCG is slow) or a lighter command; console tail:\n"
                                         + "\n".join(self.console[-10:]))
            chunk = self.proc.stdout.read(65536) if self.proc else None
            if chunk:
                self._buf += chunk
            elif self.proc is None or self.proc.poll() is not None:
                raise MechanismError(f"the VM stopped before it could {what}; console tail:\n"
                                     + "\n".join(self.console[-15:]), fix="see the console; run `labkit doctor`")
            else:
                time.sleep(0.002)

    def exec(self, command, timeout=120):
        """Run ``command`` (sh) in the guest; returns stdout (stderr merged), exit code, wall seconds."""
        if not isinstance(command, str) or not command.strip():
            raise InvalidSpec(f"command {command!r} must be a non-empty shell command", fix="e.g. 'uname -r'")
        line = "LKCMD " + base64.b64encode(command.encode()).decode() + "\n"
        if len(line) > 3500:
            raise InvalidSpec("the command is too long for the VM's console line",
                              fix="put the script in a file or split it; /lk/probe.sh and /lk/bench.sh are there")
        if self.proc is None or self.proc.poll() is not None:
            raise MechanismError(f"VM {self.id} is not running", fix="start it again")
        t = time.perf_counter()
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        out, end = self._read_until(initramfs.END, timeout, f"finish {command[:60]!r}")
        code = int(end.split(initramfs.END, 1)[1].split()[0])
        return {"stdout": "\n".join(out) + ("\n" if out else ""), "exit_code": code,
                "duration": time.perf_counter() - t}

    def footprint(self):
        """qemu's memory as the host sees it (RSS and PSS, KiB) and the guest's own view."""
        pid = self.proc.pid
        mem = self.exec("grep -E 'MemTotal|MemAvailable' /proc/meminfo", timeout=30)["stdout"]
        vals = dict(re.findall(r"(\w+):\s+(\d+)", mem))
        return {"qemu_rss_kb": _status_kb(pid, "VmRSS"), "qemu_pss_kb": pss_kb(pid),
                "guest_mem_total_kb": int(vals.get("MemTotal", 0)) or None,
                "guest_mem_available_kb": int(vals.get("MemAvailable", 0)) or None}

    def stop(self):
        """Kill qemu (nothing in the guest needs saving), remove the tap, the disk, the state entry."""
        _LIVE.pop(self.id, None)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        _remove(self._state(), self.rec)

    def info(self):
        return self.rec.to_dict(id=self.id, pid=self.proc.pid if self.proc else None, ip=self.net and self.net["ip"])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


_LIVE = {}


def _remove(state, rec):
    """Undo one recorded VM. The entry is a file on disk: every path and name in it must be the one this
    module would have made for its id, and the pid must still be that qemu (start time and name)."""
    vid = state.get("id")
    if not isinstance(vid, str) or not re.fullmatch(r"[0-9a-f]{8}", vid):
        return
    pid = recorded_process(state)
    if pid and f"labkit-vm-{vid}" in (read_text(f"/proc/{pid}/cmdline") or "").replace("\0", " "):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_gone(pid, state.get("starttime"), 2)
    if isinstance(state.get("network"), str):
        try:
            network.disconnect(state["network"], f"vm-{vid}")
        except LabkitError:
            pass
    tap = state.get("tap")
    if isinstance(tap, str) and network.is_labkit_link(tap) and os.path.exists(f"/sys/class/net/{tap}"):
        run(["ip", "link", "delete", tap], recorder=rec, check=False)
    disk = f"{VM_DISKS}/{vid}.img"
    if state.get("disk") == disk and os.path.exists(disk):
        os.unlink(disk)
        rec.file("unlink", disk)
    shutil.rmtree(f"{VM_RUN}/{vid}", ignore_errors=True)
    try:
        os.unlink(f"{VM_RUN}/{vid}.json")
    except FileNotFoundError:
        pass


def list_vms():
    return [st for _, st in read_dir(VM_RUN) if isinstance(st.get("id"), str)]


def cleanup(rec):
    """Kill every VM labkit started on this target (by its recorded state), then its tap and disk."""
    removed = []
    for vm in list(_LIVE.values()):
        vm.stop()
        removed.append(f"vm {vm.id}")
    for state in list_vms():
        _remove(state, rec)
        removed.append(f"vm {state['id']}")
    return removed


# -- the agent's methods --------------------------------------------------------------------------
#: the other architecture of each (machine, its Debian name), and where scripts/fetch-foreign-guest.sh puts its
#: distro kernel and static busybox
FOREIGN = {"x86_64": ("aarch64", "arm64"), "aarch64": ("x86_64", "amd64")}
FOREIGN_CACHE = "/var/cache/labkit-foreign"


def foreign_guest():
    """The other architecture's guest on this target: {'machine', 'kernel', 'busybox', 'bin_dir', 'root', 'qemu'}
    or {'missing': why, 'fix'} (a binary of another CPU cannot run on this kernel; a VM can boot it, emulated)."""
    import glob
    other = FOREIGN.get(os.uname().machine)
    if other is None:
        return {"missing": f"no other architecture is known for {os.uname().machine}", "fix": "use x86_64 or aarch64"}
    root = f"{FOREIGN_CACHE}/{other[1]}/root"
    kernels = sorted(glob.glob(f"{root}/boot/vmlinuz-*"))
    if not kernels or not os.path.isfile(f"{root}/bin/busybox"):
        return {"missing": f"no {other[0]} kernel and busybox in {root}",
                "fix": "sudo bash scripts/fetch-foreign-guest.sh (scripts/setup.sh runs it)"}
    qemu = which(QEMU[other[0]][0]) if other[0] in QEMU else None
    return {"machine": other[0], "kernel": kernels[-1], "busybox": f"{root}/bin/busybox", "bin_dir": f"{root}/bin",
            "root": root, "qemu": qemu}


def m_start(memory_mb=256, cpus=1, accel_mode=None, network_name=None, disk_mb=0, timeout=120, foreign=False):
    """A VM that stays up; ``foreign``: the other architecture's guest (:func:`foreign_guest`), emulated (TCG)."""
    guest = {}
    if foreign:
        g = foreign_guest()
        if g.get("missing"):
            raise NotFound(g["missing"], fix=g["fix"])
        guest = {"machine": g["machine"], "kernel": g["kernel"], "busybox": g["busybox"], "modules_root": g["root"]}
        accel_mode = "tcg"
    vm = VM(memory_mb=memory_mb, cpus=cpus, accel_mode=accel_mode, network_name=network_name, disk_mb=disk_mb,
            boot_timeout=timeout, **guest)
    vm.start()
    return vm.info()


def _live(vm_id):
    vm = _LIVE.get(vm_id)
    if vm is None:
        raise NotFound(f"no VM {vm_id!r} running in this agent",
                       fix="VMs live as long as the agent that started them; start a new one")
    return vm


def m_exec(vm_id, command, timeout=120):
    return _live(vm_id).exec(command, timeout=timeout)


def m_footprint(vm_id):
    return _live(vm_id).footprint()


def m_stop(vm_id):
    vm = _LIVE.get(vm_id)
    if vm is not None:
        vm.stop()
    else:
        for state in list_vms():
            if state["id"] == vm_id:
                _remove(state, Recorder("stop VM"))
    return {"id": vm_id, "stopped": True}


def boot(command="true", memory_mb=256, cpus=1, timeout=120, accel_mode=None):
    """Boot the baseline VM, run ``command`` in it, stop it; returns output, kernel, timings, footprint, accel."""
    vm = VM(memory_mb=memory_mb, cpus=cpus, accel_mode=accel_mode, boot_timeout=timeout)
    try:
        vm.start()
        res = vm.exec(command, timeout=timeout)
        fp = vm.footprint()
        vm.rec.fact("qemu_peak_rss_kb", _status_kb(vm.proc.pid, "VmHWM"))
        vm.rec.fact("qemu_pss_kb", fp["qemu_pss_kb"])
        vm.rec.fact("guest_mem_total_kb", fp["guest_mem_total_kb"])
        vm.rec.fact("guest_mem_available_kb", fp["guest_mem_available_kb"])
        vm.rec.fact("total_s", time.perf_counter() - vm.t0)
    finally:
        vm.stop()
    return vm.rec.to_dict(stdout=res["stdout"], exit_code=res["exit_code"], kernel_image=vm.rec.facts["kernel_image"],
                          command=command)
