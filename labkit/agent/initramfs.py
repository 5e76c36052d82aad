"""The VM baseline's guest root: the initramfs its kernel boots into, built from a static busybox.

:func:`build_initramfs` writes a newc cpio archive (made here, so no tool is needed), gzipped, holding busybox and
its applets, the virtio modules of the kernel it will boot (:data:`MODULES` and what they need, in load order,
unpacked for busybox's insmod), labkit's probe and workload scripts (:mod:`labkit.agent.workloads`) in ``/lk``,
and :data:`INIT`. That /init mounts /proc, /sys and /dev, says :data:`READY`, loads the modules, sets up the
network and the disk the kernel command line asks for (``labkit.ip=``, ``labkit.gw=``, ``labkit.disk=1``), says
:data:`UP`, then runs one command per console line (``LKCMD <base64>``) and ends each with :data:`END` and its exit
code: the console protocol that :class:`labkit.agent.vm.VM` speaks. Standard library only.
"""
import gzip
import io
import lzma
import os
import re
import tempfile

from . import rootfs, workloads
from .runner import read_text, run, which

READY = "LABKIT-VM-READY"
UP = "LABKIT-VM-UP"
END = "LABKIT-VM-END"
MODULES = ("virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net")

INIT = r"""#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo {ready} $(cat /proc/uptime)
for m in $(cat /lk/modules); do insmod /lk/mod/$m 2>/dev/null; done
arg() {{ sed -n "s/.*labkit\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }}
hostname labkit-vm
ip link set lo up
addr=$(arg ip)
if [ -n "$addr" ]; then
  n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
  ip addr add "$addr" dev eth0 && ip link set eth0 up && ip route add default via "$(arg gw)"
fi
if [ "$(arg disk)" = 1 ]; then
  n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
  mkdir -p /mnt && mount -t ext4 /dev/vda /mnt
fi
mkdir -p /tmp && mount -t tmpfs tmp /tmp
stty -echo 2>/dev/null
echo {up} $(cat /proc/uptime)
while IFS= read -r line; do
  case "$line" in "LKCMD "*) ;; *) continue ;; esac
  cmd=$(echo "${{line#LKCMD }}" | base64 -d)
  sh -c "$cmd" </dev/null 2>&1
  echo "{end} $?"
done
poweroff -f
"""


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


def _kernel_release(kernel_path):
    name = os.path.basename(kernel_path)
    return name[len("vmlinuz-"):] if name.startswith("vmlinuz-") else None


def _module_files(release, names=MODULES, root="/"):
    """[(file name, bytes)] for the named modules of ``release`` and what they need, in load order.

    Built-in drivers (modules.builtin) need nothing; .ko.xz and .ko.gz are unpacked here (busybox insmod
    takes plain ELF), .ko.zst with the zstd tool when there is one."""
    base = os.path.join(root, f"lib/modules/{release}") if release else None
    if not base or not os.path.isdir(base):
        return [], [f"no /lib/modules/{release}: only built-in drivers (no disk or network if virtio is modular)"]
    deps_text = read_text(f"{base}/modules.dep")
    deps = {}
    if deps_text:
        for line in deps_text.splitlines():
            mod, _, rest = line.partition(":")
            deps[mod] = rest.split()
    else:
        # an unpacked kernel package has no modules.dep (depmod writes it on install): read each module's
        # own "depends=" entry from its .modinfo strings instead
        found = {}
        for d, _, names_ in os.walk(base):
            for n in names_:
                if re.search(r"\.ko(\.(xz|gz|zst))?$", n):
                    found[re.sub(r"\.ko(\.\w+)?$", "", n).replace("-", "_")] = os.path.relpath(os.path.join(d, n), base)

        def deps_of(rel):
            data = _read_module(f"{base}/{rel}")
            m = re.search(rb"depends=([^\0]*)", data or b"")
            return [found[x.replace("-", "_")] for x in (m.group(1).decode().split(",") if m else []) if x and x.replace("-", "_") in found]

        todo = [found[n] for n in names if n in found]
        while todo:
            rel = todo.pop()
            if rel not in deps:
                deps[rel] = deps_of(rel)
                todo += deps[rel]
    by_name = {re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(m)).replace("-", "_"): m for m in deps}
    builtin = read_text(f"{base}/modules.builtin") or ""
    order, notes = [], []

    def visit(path):
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in names:
        if name in by_name:
            visit(by_name[name])
        elif f"/{name}.ko" not in builtin:
            notes.append(f"module {name} not found for {release}")
    files = []
    for rel in order:
        data = _read_module(f"{base}/{rel}")
        if data is None:
            notes.append(f"{os.path.basename(rel)} is zstd-compressed and zstd is not installed")
            continue
        files.append((re.sub(r"\.(xz|gz|zst)$", "", os.path.basename(rel)), data))
    return files, notes


def _applets(bb):
    """The applet names of busybox ``bb`` (a foreign-architecture busybox cannot run here: then the
    target's own busybox's list, which Debian builds from the same configuration)."""
    for binary in (bb, rootfs.find_static_busybox()):
        if not binary:
            continue
        try:
            listed = run([binary, "--list"], timeout=10, check=False).stdout.split()
        except OSError:  # a busybox for another CPU: ENOEXEC
            continue
        if listed:
            return listed
    return ["sh", "mount", "echo", "cat", "sed", "poweroff", "base64", "insmod", "ip", "hostname", "mkdir", "stty",
            "sleep", "uname", "grep", "cut", "tr", "awk", "dd", "nc", "adjtimex", "ls", "rm", "id", "readlink"]


def _read_module(path):
    """A module's ELF bytes (unpacked from .xz/.gz here, .zst with the zstd tool; None without it)."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        if not which("zstd"):
            return None
        with tempfile.TemporaryDirectory(prefix="lk-zstd-") as tmp:  # the runner's output is text: via a file
            run(["zstd", "-q", "-d", "-o", os.path.join(tmp, "m.ko"), path], timeout=60)
            with open(os.path.join(tmp, "m.ko"), "rb") as f:
                return f.read()
    return data


def build_initramfs(path, kernel=None, busybox=None, modules_root="/"):
    """The guest's root: busybox and its applets, /init, the probe and workload scripts, virtio modules."""
    bb = busybox or rootfs.busybox_or_fail()
    with open(bb, "rb") as f:
        busybox = f.read()
    entries = [(d, 0o040755, b"") for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "etc", "mnt", "lk", "lk/mod")]
    entries.append(("bin/busybox", 0o100755, busybox))
    for applet in _applets(bb):
        if applet != "busybox" and "/" not in applet:
            entries.append((f"bin/{applet}", 0o120777, "busybox"))
    mods, notes = _module_files(_kernel_release(kernel), root=modules_root) if kernel else ([], [])
    for name, data in mods:
        entries.append((f"lk/mod/{name}", 0o100644, data))
    entries.append(("lk/modules", 0o100644, "\n".join(n for n, _ in mods) + "\n"))
    entries.append(("lk/probe.sh", 0o100755, workloads.PROBE_SH))
    entries.append(("lk/bench.sh", 0o100755, workloads.BENCH_SH))
    entries.append(("init", 0o100755, INIT.format(ready=READY, up=UP, end=END)))
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(_cpio(entries))
    return notes
