"""The VM baseline: a real virtual machine booted with qemu, running the same busybox as the containers.

``boot(command)`` builds an initramfs from the target's static busybox (a newc cpio archive written
here, so no tool is needed), boots a distro kernel with it under qemu -- KVM when the doctor's probe
says it works, TCG otherwise, and every result says which -- runs ``command`` as the guest's first job,
and returns what it printed, the guest's kernel release, the boot-to-ready time and qemu's memory
footprint. The guest prints markers on its serial console; the host reads them. Nothing outlives the
call: qemu is killed on any error or timeout. Standard library only.
"""
import glob
import gzip
import io
import os
import re
import shlex
import subprocess
import tempfile
import time

from ..errors import CommandTimeout, MechanismError, NotFound
from . import doctor, rootfs
from .runner import Recorder, read_text, which

READY = "LABKIT-VM-READY"
DONE = "LABKIT-VM-DONE"
QEMU = {"x86_64": ("qemu-system-x86_64", ["-M", "q35"], "ttyS0"),
        "aarch64": ("qemu-system-aarch64", ["-M", "virt", "-cpu", "max"], "ttyAMA0")}

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo {ready} $(cat /proc/uptime)
cmd=$(sed -n 's/.*labkit.cmd=\\([^ ]*\\).*/\\1/p' /proc/cmdline | base64 -d 2>/dev/null)
echo LABKIT-VM-KERNEL $(uname -r)
echo LABKIT-VM-MEMKB $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2) $(grep MemAvailable /proc/meminfo | tr -s ' ' | cut -d' ' -f2)
echo LABKIT-VM-OUT-BEGIN
sh -c "$cmd"
echo LABKIT-VM-OUT-END $?
echo {done}
poweroff -f
"""


def find_kernel():
    """The target's own /boot kernel when readable, else nothing (the fix says which package to add)."""
    for path in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        if os.access(path, os.R_OK) and os.path.getsize(path) > 1 << 20:
            return path
    raise NotFound("no readable kernel in /boot for the VM baseline",
                   fix="install a distro kernel: `sudo apt-get install linux-image-cloud-amd64` "
                       "(linux-image-cloud-arm64 on arm64)")


def _cpio(entries):
    """A newc cpio archive from [(name, mode, data or link target)]."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data in entries + [("TRAILER!!!", 0, b"")]:
        data = data.encode() if isinstance(data, str) else data
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out.write(hdr.encode() + nb)
        out.write(b"\0" * ((4 - (110 + len(nb)) % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))
        ino += 1
    return out.getvalue()


def build_initramfs(path):
    bb = rootfs.busybox_or_fail()
    with open(bb, "rb") as f:
        busybox = f.read()
    entries = [(d, 0o040755, b"") for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "etc")]
    entries.append(("bin/busybox", 0o100755, busybox))
    for applet in ("sh", "mount", "echo", "cat", "sed", "grep", "tr", "cut", "uname", "poweroff", "base64", "ls",
                   "ps", "dd", "sync", "sleep", "true", "seq", "wc", "head", "md5sum", "sha256sum", "date", "id",
                   "hostname", "mkdir", "rm", "cp", "awk", "time"):
        entries.append((f"bin/{applet}", 0o120777, "busybox"))
    entries.append(("init", 0o100755, INIT.format(ready=READY, done=DONE)))
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(_cpio(entries))
    return path


PROBE_CACHE = "/run/labkit/kvm-vm-probe.json"


def accel(probe_timeout=20):
    """('kvm', reason) when a real guest boots under KVM within ``probe_timeout`` s, else ('tcg', reason).

    The doctor's boot-sector probe comes first (cheap); when it passes, a full boot of this VM is tried
    under KVM with a time limit, because nested KVM can run a boot sector and still hang a kernel.
    The answer is cached until the target reboots."""
    import json
    probe = doctor.probe_kvm()
    if not probe.get("usable"):
        return "tcg", probe.get("reason", "KVM is not usable")
    boot_id = (read_text("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        cached = json.loads(read_text(PROBE_CACHE) or "{}")
        if cached.get("boot_id") == boot_id:
            return cached["mode"], cached["reason"]
    except ValueError:
        pass
    try:
        r = boot("true", accel_mode="kvm", timeout=probe_timeout)
        mode, reason = "kvm", f"a KVM guest booted to ready in {r['facts']['boot_to_ready_s']:.2f} s"
    except (CommandTimeout, MechanismError) as exc:
        mode, reason = "tcg", (f"a KVM guest did not boot within {probe_timeout} s: "
                               f"using TCG, slower but correct ({exc.message.splitlines()[0]})")
    os.makedirs(os.path.dirname(PROBE_CACHE), exist_ok=True)
    with open(PROBE_CACHE, "w") as f:
        json.dump({"boot_id": boot_id, "mode": mode, "reason": reason}, f)
    return mode, reason


def _rss_kb(pid):
    for line in (read_text(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def boot(command="true", memory_mb=256, cpus=1, timeout=120, accel_mode=None):
    """Boot the baseline VM, run ``command`` in it; returns output, kernel, timings, footprint, accel."""
    import base64
    machine = os.uname().machine
    if machine not in QEMU:
        raise MechanismError(f"no VM baseline for {machine}", fix="use an x86_64 or aarch64 target")
    qemu_name, mach_args, console = QEMU[machine]
    qemu = which(qemu_name)
    if not qemu:
        raise NotFound(f"{qemu_name} is not installed", fix="`sudo apt-get install qemu-system-x86` (or -arm)")
    kernel = find_kernel()
    mode, why = (accel_mode, "asked for") if accel_mode else accel()
    rec = Recorder(f"boot a VM ({mode}) and run {command!r}")
    rec.fact("accel", mode)
    rec.fact("accel_reason", why)
    with tempfile.TemporaryDirectory(prefix="labkit-vm-") as d:
        initrd = build_initramfs(os.path.join(d, "initrd.gz"))
        cmdline = (f"console={console} quiet panic=-1 rdinit=/init "
                   f"labkit.cmd={base64.b64encode(command.encode()).decode()}")
        argv = [qemu, *mach_args, "-accel", mode, "-m", str(memory_mb), "-smp", str(cpus), "-nographic",
                "-nodefaults", "-no-reboot", "-serial", "stdio", "-monitor", "none", "-kernel", kernel,
                "-initrd", initrd, "-append", cmdline]
        if mode == "kvm":
            argv[argv.index("-accel") + 1] = "kvm"
        rec.add({"kind": "command", "argv": argv, "exit_code": None, "stdout": "", "stderr": "", "duration": 0})
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines, ready_at, peak_rss = [], None, 0
        try:
            deadline = time.monotonic() + timeout
            os.set_blocking(proc.stdout.fileno(), False)
            buf = b""
            while True:
                if time.monotonic() > deadline:
                    raise CommandTimeout(f"the VM did not finish within {timeout} s ({mode})",
                                         fix="give it longer (TCG is slow) or a lighter command")
                chunk = proc.stdout.read(65536)
                if chunk:
                    buf += chunk
                    *full, buf = buf.split(b"\n")
                    for raw in full:
                        line = raw.decode("utf-8", "replace").rstrip("\r")
                        lines.append(line)
                        if READY in line and ready_at is None:
                            ready_at = time.perf_counter() - start
                            peak_rss = max(peak_rss, _rss_kb(proc.pid) or 0)
                elif proc.poll() is not None:
                    break
                else:
                    rss = _rss_kb(proc.pid)
                    peak_rss = max(peak_rss, rss or 0)
                    time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        total = time.perf_counter() - start
    text = "\n".join(lines)
    if DONE not in text:
        raise MechanismError(f"the VM ended without finishing its command ({mode}); console tail:\n"
                             + "\n".join(lines[-15:]), fix="see the console output; run `labkit doctor`")
    out = text.split("LABKIT-VM-OUT-BEGIN", 1)[1].split("LABKIT-VM-OUT-END", 1)
    status = int(out[1].split()[0]) if out[1].split() else None
    mem = re.search(r"LABKIT-VM-MEMKB (\d+) (\d+)", text)
    rec.fact("kernel", re.search(r"LABKIT-VM-KERNEL (\S+)", text).group(1))
    rec.fact("host_kernel", os.uname().release)
    rec.fact("boot_to_ready_s", ready_at)
    rec.fact("total_s", total)
    rec.fact("qemu_peak_rss_kb", peak_rss)
    rec.fact("guest_mem_total_kb", int(mem.group(1)) if mem else None)
    rec.fact("guest_mem_available_kb", int(mem.group(2)) if mem else None)
    return rec.to_dict(stdout=out[0].strip("\n") + ("\n" if out[0].strip() else ""), exit_code=status,
                       kernel_image=kernel, command=shlex.split(command)[:1])
