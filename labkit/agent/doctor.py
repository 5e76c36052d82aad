"""``labkit doctor``: what this target can do for the course, each line with the fix when it cannot.

Every line comes from a real probe on the target, not from a version table: namespaces are created,
a veth pair and a bridge are made (inside a throwaway ``lk-doctor-*`` network namespace that is
removed again), KVM is asked to run guest code under a time limit. Standard library only.
"""
import glob
import json
import os
import platform
import secrets
import sys
import time

from ..wire.errors import LabkitError
from ..wire.specs import NAMESPACES, RUN_DIR, ProcessSpec
from . import cgroups, process, rootfs
from .runner import proc_stat, read_text, run, which

KVM_CACHE = RUN_DIR + "/kvm-probe.json"
QEMU_BY_ARCH = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
SETUP_FIX = "run `sudo bash scripts/setup.sh` (or vagrant/provision.sh) on the target"


def _line(name, ok, value, detail="", fix="", level=None):
    status = level or ("ok" if ok else "missing")
    return {"check": name, "status": status, "value": value, "detail": detail, "fix": "" if ok else fix}


def check_kernel():
    u = os.uname()
    return _line("kernel", u.sysname == "Linux", f"{u.sysname} {u.release}", f"arch {u.machine}",
                 fix="the agent needs a Linux kernel; use the lab VM")


def check_arch():
    m = os.uname().machine
    return _line("arch", m in QEMU_BY_ARCH, m, "x86_64 and aarch64 are supported",
                 fix="use an x86_64 or aarch64 machine or VM", level=None if m in QEMU_BY_ARCH else "warn")


def check_cgroups():
    d = cgroups.detect()
    if d["mode"] == "none":
        return _line("cgroups", False, "none", "no cgroup filesystem is mounted",
                     fix="mount cgroup2 on /sys/fs/cgroup (`mount -t cgroup2 none /sys/fs/cgroup`)")
    parts = []
    if d["v2_mount"]:
        parts.append(f"v2 at {d['v2_mount']}: {' '.join(d['v2_controllers']) or '(no controllers)'}")
    v1 = sorted(c for c in d["v1"] if not c.startswith("name="))
    if v1:
        parts.append("v1: " + " ".join(v1))
    return _line("cgroups", True, d["mode"], "; ".join(parts))


def check_overlay():
    fs = read_text("/proc/filesystems") or ""
    ok = any(line.split()[-1] == "overlay" for line in fs.splitlines() if line.strip())
    if not ok and which("modprobe"):
        run(["modprobe", "overlay"], check=False)
        fs = read_text("/proc/filesystems") or ""
        ok = any(line.split()[-1] == "overlay" for line in fs.splitlines() if line.strip())
    return _line("overlayfs", ok, "available" if ok else "missing", "image layers are stacked with it",
                 fix="load it: `sudo modprobe overlay` (kernel option CONFIG_OVERLAY_FS)")


def check_namespaces():
    have = [n for n in NAMESPACES if os.path.exists(f"/proc/self/ns/{n}")]
    missing = [n for n in NAMESPACES if n not in have]
    if missing:
        return _line("namespaces", False, " ".join(have), f"missing: {' '.join(missing)}",
                     fix="use a kernel built with CONFIG_*_NS for these (any current distro kernel)")
    try:
        res = process.run(ProcessSpec(action="probe", namespaces=NAMESPACES), timeout=20)
        fresh = [n for n, shared in res["facts"]["shares_with_host"].items() if not shared]
    except LabkitError as exc:
        return _line("namespaces", False, " ".join(have), f"creating them failed: {exc.message}",
                     fix="check `sysctl user.max_user_namespaces` (> 0) and that the agent runs as root")
    return _line("namespaces", set(fresh) == set(NAMESPACES), " ".join(have),
                 f"created all {len(fresh)} in a probe process", fix="see the detail")


def check_user_namespaces():
    maxns = (read_text("/proc/sys/user/max_user_namespaces") or "").strip()
    unpriv = (read_text("/proc/sys/kernel/unprivileged_userns_clone") or "").strip()
    ok = maxns not in ("", "0")
    detail = f"user.max_user_namespaces={maxns or '?'}"
    if unpriv:
        detail += f", kernel.unprivileged_userns_clone={unpriv}"
    return _line("user namespaces", ok, "enabled" if ok else "disabled", detail,
                 fix="`sudo sysctl -w user.max_user_namespaces=15000`")


def check_links():
    ip = which("ip")
    if not ip:
        return _line("veth/bridge", False, "no iproute2", fix="install iproute2; " + SETUP_FIX)
    ns = "lk-doctor-" + secrets.token_hex(3)
    made = False
    try:
        run(["ip", "netns", "add", ns])
        made = True
        run(["ip", "-n", ns, "link", "add", "lkd0", "type", "veth", "peer", "name", "lkd1"])
        run(["ip", "-n", ns, "link", "add", "lkdbr0", "type", "bridge"])
        run(["ip", "-n", ns, "link", "set", "lkd0", "master", "lkdbr0"])
        return _line("veth/bridge", True, "working", "made a veth pair and a bridge in a throwaway namespace")
    except LabkitError as exc:
        return _line("veth/bridge", False, "failed", exc.message,
                     fix="load the modules: `sudo modprobe veth bridge`")
    finally:
        if made:
            run(["ip", "netns", "delete", ns], check=False)


def check_firewall():
    found = []
    if which("nft") and run(["nft", "list", "tables"], check=False).ok:
        found.append("nft")
    if which("iptables"):  # --version only: listing would create iptables-nft's tables on the host
        v = run(["iptables", "--version"], check=False)
        if v.ok:
            found.append(v.stdout.strip() or "iptables")
    return _line("iptables/nft", bool(found), ", ".join(found) or "none", "NAT and port publishing need one",
                 fix="install nftables or iptables; " + SETUP_FIX)


def _boot_sector():
    # mov al,1; out 0xf4,al; hlt; jmp $-1 -- isa-debug-exit turns the out into qemu exit code 3
    code = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def probe_kvm(timeout=10.0):
    """Ask qemu to run guest code under KVM within ``timeout`` seconds (x86_64 boot-sector probe)."""
    machine = os.uname().machine
    if not os.path.exists("/dev/kvm"):
        return {"usable": False, "reason": "/dev/kvm does not exist (no hardware virtualisation or nested "
                                           "virtualisation is off)"}
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        return {"usable": False, "reason": f"cannot open /dev/kvm: {exc.strerror}"}
    qemu = which(QEMU_BY_ARCH.get(machine, ""))
    if machine != "x86_64" or not qemu:
        return {"usable": None, "reason": "/dev/kvm opens; guest code not probed (needs qemu-system-x86_64)"}
    cached = read_boot_cache(KVM_CACHE)
    if cached and "result" in cached:
        return cached["result"]
    import tempfile
    with tempfile.TemporaryDirectory(prefix="labkit-kvm-") as d:
        img = os.path.join(d, "boot.img")
        with open(img, "wb") as f:
            f.write(_boot_sector())
        argv = [qemu, "-accel", "kvm", "-M", "pc", "-m", "16", "-display", "none", "-nodefaults",
                "-no-reboot", "-serial", "none", "-monitor", "none",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-drive", f"file={img},format=raw,if=ide"]
        start = time.perf_counter()
        try:
            res = run(argv, check=False, timeout=timeout)
            took = time.perf_counter() - start
            if res.exit_code == 3:
                result = {"usable": True, "reason": f"qemu ran a boot sector under KVM in {took:.2f} s "
                                                    "(a full kernel boot is probed by the VM baseline)"}
            else:
                result = {"usable": False, "reason": f"qemu -accel kvm exited {res.exit_code}: "
                                                     f"{res.stderr.strip()[-200:]}"}
        except LabkitError:
            result = {"usable": False, "reason": f"a KVM guest did not finish a boot sector within {timeout:.0f} s "
                                                 "(nested KVM hangs); the VM baseline will use TCG"}
    write_boot_cache(KVM_CACHE, {"result": result})
    return result


def _boot_id():
    return (read_text("/proc/sys/kernel/random/boot_id") or "").strip()


def read_boot_cache(path):
    """What was cached at ``path`` since the target last booted (the entry minus its boot id), else None."""
    try:
        data = json.loads(read_text(path) or "{}")
    except ValueError:
        return None
    if not isinstance(data, dict) or data.pop("boot_id", None) != _boot_id():
        return None
    return data


def write_boot_cache(path, payload):
    """Cache ``payload`` (a dict) at ``path`` until the target reboots."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"boot_id": _boot_id(), **payload}, f)


VM_PROBE_CACHE = "/run/labkit/kvm-vm-probe.json"  # the VM baseline's full-boot verdict, per boot


def check_kvm():
    r = probe_kvm()
    full = read_boot_cache(VM_PROBE_CACHE) or {}
    if r["usable"] and full.get("mode") == "tcg":
        return _line("kvm", False, "boot sector only (TCG will be used)", f"{r['reason']}; but {full['reason']}",
                     fix="nested KVM runs a boot sector and hangs a kernel here: the VM baseline uses TCG, "
                         "slower but correct", level="warn")
    if r["usable"] is None:
        return _line("kvm", True, "unprobed", r["reason"], level="warn")
    return _line("kvm", bool(r["usable"]), "usable" if r["usable"] else "not usable (TCG will be used)",
                 r["reason"], fix="enable (nested) virtualisation for the VM in your hypervisor; "
                                  "without it the VM baseline runs under TCG, slower but correct",
                 level=None if r["usable"] else "warn")


def check_qemu():
    name = QEMU_BY_ARCH.get(os.uname().machine, "qemu-system-x86_64")
    q = which(name)
    if not q:
        return _line("qemu", False, "missing", f"{name} runs the VM baseline",
                     fix=f"install it: `sudo apt-get install {'qemu-system-arm' if 'aarch64' in name else 'qemu-system-x86'}`",
                     level="warn")
    v = run([q, "--version"], check=False).stdout.splitlines()
    return _line("qemu", True, v[0] if v else q, q)


def boot_kernel():
    """The distro kernel the VM baseline boots: the running one's image in /boot first, else the newest
    readable one; None when /boot has none (a container or WSL kernel, or an unreadable /boot)."""
    running = f"/boot/vmlinuz-{os.uname().release}"
    for path in [running] + sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        if os.path.exists(path) and os.access(path, os.R_OK) and os.path.getsize(path) > 1 << 20:
            return path
    return None


KERNEL_FIX = ("install a distro kernel: `sudo apt-get install linux-image-cloud-amd64` (linux-image-cloud-arm64 on "
              "arm64, linux-image-virtual on Ubuntu); scripts/setup.sh and vagrant/provision.sh do when /boot has none")


def check_vm_kernel():
    path = boot_kernel()
    if path is None:
        return _line("vm kernel", False, "missing", "the VM baseline boots a distro kernel from /boot",
                     fix=KERNEL_FIX, level="warn")
    running = os.path.basename(path) == f"vmlinuz-{os.uname().release}"
    return _line("vm kernel", True, os.path.basename(path), "the VM baseline boots it"
                 + ("" if running else f" (this machine runs {os.uname().release}, a kernel not in /boot)"))


def check_busybox():
    bb = rootfs.find_static_busybox()
    return _line("busybox", bb is not None, bb or "missing", "static: the built-in image is made from it",
                 fix="install it: `sudo apt-get install busybox-static`")


def check_tools():
    need = ["ip", "nsenter", "unshare", "mount"]
    missing = [t for t in need if not which(t)]
    return _line("userland", not missing, "present" if not missing else "missing: " + " ".join(missing),
                 " ".join(need), fix="install util-linux and iproute2; " + SETUP_FIX)


def check_agent():
    v = sys.version_info
    ok = v >= (3, 9)
    return _line("agent", ok and os.geteuid() == 0, f"python {platform.python_version()}",
                 f"euid {os.geteuid()}", fix="the agent needs python 3.9+ and root")


_SHELLS = ("sh", "bash", "dash", "zsh", "ksh", "fish", "tcsh", "csh")


def _parent(pid):
    """(parent pid, parent's command name) from /proc, or (0, "")."""
    fields = proc_stat(pid)
    if not fields or not fields[1].isdigit():
        return 0, ""
    ppid = int(fields[1])
    return ppid, (read_text(f"/proc/{ppid}/comm") or "").strip() if ppid > 1 else ""


def _started_by_sshd():
    """True when an SSH login ran this agent: sshd (sshd-session since OpenSSH 9.8) is its parent,
    with at most sudo and a shell between them (as the SSH transport starts it)."""
    pid = os.getpid()
    for _ in range(6):
        pid, comm = _parent(pid)
        if comm in ("sshd", "sshd-session"):
            return True
        if comm != "sudo" and comm not in _SHELLS:
            return False
    return False


def _served():
    """True when this process is an agent of its own (``python3 agent.pyz`` or ``-m labkit.agent``),
    False when the agent's code runs inside the client (the in-process transport)."""
    main = (sys.argv[0] if sys.argv else "") or ""
    return main.endswith(".pyz") or main.endswith(os.path.join("agent", "__main__.py"))


def check_access():
    """How the agent was reached, said plainly: whoever can reach it that way is root on this machine."""
    if os.geteuid() != 0:
        return _line("agent access", False, f"not root (euid {os.geteuid()})", "the agent needs root",
                     fix="start it as root: labkit.connect('sudo'), 'vagrant' or 'ssh://root@host'")
    if not _served():
        return _line("agent access", True, "root (in-process)",
                     "agent access is root here: the process running labkit is root")
    user = os.environ.get("SUDO_USER")
    if _started_by_sshd():
        how, who = (f"ssh + sudo ({user})", f"anyone with {user}'s SSH login") if user else \
            ("ssh (root)", "anyone with root's SSH login")
    elif user:
        how, who = f"sudo ({user})", f"every program {user} runs"
    else:
        how, who = "a root process", "whatever started it"
    return _line("agent access", True, f"root via {how}", f"agent access is root here: so is {who}")


CHECKS = (check_kernel, check_arch, check_agent, check_access, check_cgroups, check_overlay, check_namespaces,
          check_user_namespaces, check_links, check_firewall, check_kvm, check_qemu, check_vm_kernel, check_busybox,
          check_tools)


def doctor():
    lines = []
    for check in CHECKS:
        try:
            lines.append(check())
        except Exception as exc:  # noqa: BLE001 - one broken probe must not hide the others
            lines.append(_line(check.__name__[6:], False, "probe failed", f"{type(exc).__name__}: {exc}",
                               fix="report this as a labkit bug"))
    return {"lines": lines, "ok": all(line["status"] != "missing" for line in lines)}
