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
import stat
import sys
import tempfile

from ..wire.errors import MechanismError
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
    """A newc cpio archive from [(name, mode, data or link target[, mtime])] (mtime 0 unless given: a
    Python source keeps its own, or its cached bytecode would not match it)."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data, *rest in entries + [("TRAILER!!!", 0, b"")]:
        data = data.encode() if isinstance(data, str) else data
        nb = name.encode() + b"\0"
        mtime = int(rest[0]) if rest else 0
        hdr = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(nb), 0))
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


# -- the grading VM's root: the agent itself, on the target's own Python ---------------------------------------------
#: the kernel modules the grading guest loads (what the labs use: overlay, veths, bridges, nftables), with virtio's
AGENT_MODULES = MODULES + ("virtio_console", "overlay", "veth", "bridge", "br_netfilter", "nf_tables", "nft_chain_nat",
                           "nft_ct", "nft_nat", "nft_masq", "nft_redir", "nft_fib_ipv4", "nft_numgen", "nft_compat", "nf_nat", "nf_conntrack",
                           "xt_conntrack", "xt_MASQUERADE", "xt_addrtype", "xt_nat", "xt_comment", "iptable_nat",
                           "iptable_filter", "sch_netem", "sch_tbf", "sch_htb", "cls_u32")
#: the target's programs the agent runs (besides busybox's applets); the ones the target lacks are left out
AGENT_TOOLS = ("ip", "tc", "nft", "iptables", "unshare", "nsenter", "setpriv", "zstd", "mkfs.ext4", "tar", "bash",
               "docker-registry")
#: the parts of the standard library no agent imports
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "site-packages",
               "dist-packages", "unittest", "distutils")
#: the console line the grading guest prints once its agent is imported and waits for the grader
AGENT_READY = "LABKIT-AGENT-READY"

AGENT_INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# the initramfs's own root cannot be pivoted away from: serve from a bind mount of it moved over it, as a
# disk-backed root would be (so that the labs' pivot_root works here as on the lab VM)
mkdir -p /.root && mount -o bind / /.root && cd /.root && mount -o move . / && exec chroot . /lk/init2
echo "labkit: cannot move the root" ; exec sh
"""

AGENT_INIT2 = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=0755 run /run
mount -t tmpfs -o mode=1777 tmp /tmp
for m in $(cat /lk/modules); do insmod /lk/mod/$m 2>/dev/null; done
hostname labkit-grade
ip link set lo up
exec python3 -I -S -c "import sys; sys.path.insert(0, '/lk'); from labkit.agent.vmsandbox import guest_main; sys.exit(guest_main())" </dev/null
"""


class _Tree:
    """Host files gathered at their own paths (with the symlinks on the way, so /lib -> usr/lib stays one)."""

    def __init__(self):
        self.dirs, self.files, self.links = set(), {}, {}

    def add(self, path, data=None, mode=None):
        """``path`` of the target (or ``data`` put there), with every symlink on the way to it."""
        parts, cur, hops = path.strip("/").split("/"), "", 0
        while parts:
            cur = cur + "/" + parts.pop(0)
            if data is None and os.path.islink(cur):
                hops += 1
                if hops > 40:
                    raise MechanismError(f"{path}: too many symbolic links", fix="check the target's files")
                target = os.readlink(cur)
                self.links[cur] = target
                parent = os.path.dirname(cur)
                self.dirs.add(parent)
                parts = os.path.normpath(os.path.join(parent, target)).strip("/").split("/") + parts
                cur = ""
            elif parts:
                self.dirs.add(cur)
        if data is None:
            st = os.stat(cur)
            if not stat.S_ISREG(st.st_mode):
                return
            with open(cur, "rb") as f:
                data = f.read()
            self.files[cur] = (mode or stat.S_IMODE(st.st_mode), data, int(st.st_mtime))
        else:
            self.files[cur] = (mode or 0o644, data, 0)

    def add_elf(self, path):
        """An executable or library and every shared library it needs (as ``ldd`` reads them)."""
        self.add(path)
        out = run(["ldd", path], timeout=30, check=False).stdout
        for lib in re.findall(r"(?:=>\s*)?(/\S+)\s+\(0x", out):
            self.add(lib)

    def entries(self):
        dirs = set()
        for d in self.dirs | {os.path.dirname(p) for p in self.files}:
            while d not in ("", "/") and d not in self.links:
                dirs.add(d)
                d = os.path.dirname(d)
        out = [(d.lstrip("/"), 0o040755, b"") for d in sorted(dirs, key=lambda d: (d.count("/"), d))]
        out += [(p.lstrip("/"), 0o100000 | m, data, mt) for p, (m, data, mt) in sorted(self.files.items())]
        out += [(p.lstrip("/"), 0o120777, t) for p, t in sorted(self.links.items()) if p not in dirs]
        return out


def build_agent_initramfs(path, kernel, package_dir, busybox=None):
    """The grading guest's root: the target's own Python (its standard library, without tests, GUI and
    packaging), the programs in :data:`AGENT_TOOLS` with their libraries, busybox for the rest, labkit's agent
    (the package's ``__init__``, wire and agent: what :func:`labkit.agent.vmsandbox.guest_main` serves), the
    modules in :data:`AGENT_MODULES`. Nothing of the host's configuration or secrets: /etc holds a passwd and
    a group of its own. Returns the notes (what was left out)."""
    import sysconfig
    tree, notes = _Tree(), []
    exe = os.path.realpath(sys.executable)
    tree.add_elf(exe)
    tree.links["/usr/bin/python3"] = os.path.basename(exe) if os.path.dirname(exe) == "/usr/bin" else exe
    stdlib = sysconfig.get_paths()["stdlib"]
    for d, subdirs, files in os.walk(stdlib):
        subdirs[:] = [s for s in subdirs if not (d == stdlib and s in STDLIB_SKIP) and not s.startswith("config-")]
        for fn in files:
            if fn.endswith((".py", ".so")) or (fn.endswith(".pyc") and ".opt-" not in fn):
                full = os.path.join(d, fn)
                if fn.endswith(".so"):
                    tree.add_elf(full)
                elif not os.path.islink(full):
                    tree.add(full)
    for tool in AGENT_TOOLS:
        found = which(tool)
        if found:
            tree.add_elf(found)
        else:
            notes.append(f"{tool} is not installed here: the grading guest has busybox's, if any")
    xtables = "/usr/lib/x86_64-linux-gnu/xtables" if os.uname().machine == "x86_64" else "/usr/lib/aarch64-linux-gnu/xtables"
    if os.path.isdir(xtables):
        for fn in sorted(os.listdir(xtables)):
            tree.add_elf(os.path.join(xtables, fn))
    bb = busybox or rootfs.busybox_or_fail()
    tree.add(bb)
    for applet in _applets(bb):
        taken = {f"/usr/bin/{applet}", f"/usr/sbin/{applet}"} & (tree.files.keys() | tree.links.keys())
        if applet != "busybox" and "/" not in applet and not taken:
            tree.links[f"/usr/bin/{applet}"] = os.path.realpath(bb)
    for top in ("bin", "sbin", "lib", "lib64"):  # merged /usr, as Debian has it
        if os.path.islink(f"/{top}"):
            tree.links[f"/{top}"] = os.readlink(f"/{top}")
    for fn in ("__init__.py",):
        tree.add(f"/lk/labkit/{fn}", data=_read(os.path.join(package_dir, fn)))
    for pkg in ("wire", "agent"):
        for fn in sorted(os.listdir(os.path.join(package_dir, pkg))):
            if fn.endswith(".py"):
                tree.add(f"/lk/labkit/{pkg}/{fn}", data=_read(os.path.join(package_dir, pkg, fn)))
    tree.add("/etc/passwd", data=rootfs.PASSWD)
    tree.add("/etc/group", data=rootfs.GROUP)
    tree.add("/etc/hostname", data="labkit-grade\n")
    mods, more = _module_files(_kernel_release(kernel), names=AGENT_MODULES)
    notes += more
    for name, data in mods:
        tree.add(f"/lk/mod/{name}", data=data)
    tree.add("/lk/modules", data="\n".join(n for n, _ in mods) + "\n")
    tree.add("/lk/init2", data=AGENT_INIT2, mode=0o755)
    tree.add("/init", data=AGENT_INIT, mode=0o755)
    entries = tree.entries()
    entries += [(d, 0o040755, b"") for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "var", "var/lib")
                if d not in {e[0] for e in entries}]
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as f:
        f.write(_cpio(entries))  # the same bytes for the same files: its hash names the grading VM's snapshot
    return notes


def _read(path):
    with open(path, "rb") as f:
        return f.read()
