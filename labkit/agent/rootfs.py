"""Root filesystems: the built-in ``busybox`` image and the runtime's /proc, /sys and /dev.

``create(spec)`` builds /var/lib/labkit/rootfs/<name> from the target's *static* busybox (so it
works offline and on any CPU): one binary, a symlink per applet, a minimal /etc. ``remove(name)``
deletes only a rootfs labkit made (it carries a marker file) after checking nothing is mounted in it.
``setup_runtime_mounts(root)`` mounts what a container runtime mounts into a new root (proc, a
read-only sysfs, a tmpfs /dev with the safe device nodes, devpts, shm), the way runc does.
Standard library only.
"""
import os
import posixpath
import shutil
import stat
import struct

from ..wire.errors import InvalidSpec, MechanismError, NotFound
from ..wire.specs import ROOTFS_DIR, RootfsSpec, check_name, rootfs_path
from . import kernel
from .runner import Recorder, read_text, run, which

MARKER = ".labkit-rootfs"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/busybox/busybox-static", "/sbin/busybox")


def is_static_elf(path):
    """True when ``path`` is an ELF executable without a PT_INTERP header (needs no shared libraries)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF":
                return False
            is64, little = head[4] == 2, head[5] == 1
            e = "<" if little else ">"
            if is64:
                phoff, = struct.unpack(e + "Q", head[32:40])
                phentsize, phnum = struct.unpack(e + "HH", head[54:58])
            else:
                phoff, = struct.unpack(e + "I", head[28:32])
                phentsize, phnum = struct.unpack(e + "HH", head[42:46])
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                if struct.unpack(e + "I", f.read(4))[0] == 3:  # PT_INTERP
                    return False
            return True
    except (OSError, struct.error):
        return False


def find_static_busybox():
    for p in BUSYBOX_CANDIDATES:
        if os.path.exists(p) and is_static_elf(os.path.realpath(p)):
            return os.path.realpath(p)
    return None


def busybox_or_fail():
    bb = find_static_busybox()
    if bb is None:
        raise NotFound("no static busybox on the target: the built-in image is made from it",
                       fix="install it: `sudo apt-get install busybox-static` (Debian/Ubuntu), "
                           "or run `sudo bash scripts/setup.sh` / vagrant/provision.sh")
    return bb


PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def populate(tmp, hostname, rec, shown=None):
    """Fill directory ``tmp`` with the busybox userland and a minimal /etc (``shown``: the path to report)."""
    shown = shown or tmp
    bb = busybox_or_fail()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev",
              "var/www", "home"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    os.chmod(os.path.join(tmp, "tmp"), 0o1777)
    os.chmod(os.path.join(tmp, "root"), 0o700)
    shutil.copy2(bb, os.path.join(tmp, "bin/busybox"))
    rec.file("copy", bb, f"-> {shown}/bin/busybox ({os.path.getsize(bb)} bytes, static)")
    listing = run([bb, "--list-full"], recorder=rec).stdout.split()
    applets = []
    for rel in listing:
        rel = rel.strip("/")
        if not rel or ".." in rel or rel == "bin/busybox":
            continue
        dst = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.lexists(dst):
            os.symlink("/bin/busybox", dst)
            applets.append(rel.rsplit("/", 1)[-1])
    rec.file("symlink", f"{shown}/{{bin,sbin,usr/bin,usr/sbin}}/<applet>", f"{len(applets)} applets -> /bin/busybox")
    files = {"etc/passwd": PASSWD, "etc/group": GROUP, "etc/hostname": hostname + "\n",
             "etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n",
             "etc/os-release": 'NAME="labkit busybox"\nID=labkit-busybox\nPRETTY_NAME="labkit busybox rootfs"\n',
             "etc/profile": "export PATH=/bin:/sbin:/usr/bin:/usr/sbin\nexport PS1='\\u@\\h:\\w\\$ '\n",
             "var/www/index.html": "<h1>Hello from a labkit container</h1>\n",
             MARKER: f"made by labkit from {bb}\n"}
    for rel, text in files.items():
        with open(os.path.join(tmp, rel), "w") as f:
            f.write(text)
        rec.file("write", f"{shown}/{rel}")


def create(spec: RootfsSpec, replace=False):
    """Build the rootfs; returns a record with its path, size and the applets it has."""
    rec = Recorder(f"build rootfs {spec.name!r} from the built-in busybox image")
    root = rootfs_path(spec.name)
    if os.path.lexists(root):
        if not replace:
            return info(spec.name, rec=rec, existed=True)
        remove(spec.name)
    busybox_or_fail()
    os.makedirs(ROOTFS_DIR, mode=0o755, exist_ok=True)
    tmp = f"{root}.tmp-{os.getpid()}-{os.urandom(4).hex()}"  # a name of its own: two agents may build at once
    try:
        populate(tmp, spec.hostname, rec, shown=root)
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isfile(os.path.join(root, MARKER)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another agent built it first
            return info(spec.name, rec=rec, existed=True)
        rec.file("rename", tmp, f"-> {root}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info(spec.name, rec=rec, existed=False)


def info(name, rec=None, existed=True):
    root = rootfs_path(name)
    if not os.path.isfile(os.path.join(root, MARKER)):
        raise NotFound(f"there is no labkit rootfs {name!r} (looked in {root})",
                       fix=f"make it first: lab.rootfs({name!r})")
    rec = rec or Recorder(f"inspect rootfs {name!r}")
    size, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            st = os.lstat(p)
            count += 1
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
    rec.fact("path", root)
    rec.fact("existed", existed)
    rec.fact("files", count)
    rec.fact("bytes", size)
    rec.fact("top", sorted(os.listdir(root)))
    return rec.to_dict(name=name, path=root)


def list_rootfs():
    if not os.path.isdir(ROOTFS_DIR):
        return []
    return sorted(n for n in os.listdir(ROOTFS_DIR) if os.path.isfile(os.path.join(ROOTFS_DIR, n, MARKER)))


def mounts_under(path):
    """Mount points at or below ``path`` in the caller's mount namespace, deepest first."""
    path = os.path.realpath(path)
    out = []
    for line in (read_text("/proc/self/mountinfo") or "").splitlines():
        mp = _unescape(line.split()[4])
        if mp == path or mp.startswith(path.rstrip("/") + "/"):
            out.append(mp)
    return sorted(set(out), key=lambda p: -p.count("/"))


def _unescape(s):
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _refuse_if_mounted(root):
    busy = mounts_under(root)
    if busy:
        raise MechanismError(f"{root} still has mounts: {', '.join(busy)}",
                             fix="stop the processes using it (lab.processes(), .stop()) or run `labkit cleanup`")


def remove(name):
    check_name(name, "rootfs name")
    root = rootfs_path(name)
    rec = Recorder(f"remove rootfs {name!r}")
    if not os.path.lexists(root):
        return rec.to_dict(removed=False)
    if not os.path.isfile(os.path.join(root, MARKER)):
        raise InvalidSpec(f"{root} was not made by labkit (no {MARKER} marker); not removing it",
                          fix="remove it by hand if you are sure")
    _refuse_if_mounted(root)
    shutil.rmtree(root)
    rec.file("rmtree", root)
    return rec.to_dict(removed=True)


# --- the runtime's mounts inside a new root -------------------------------------------------------

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx", "core": "/proc/kcore"}


def place_in_root(root, path, kind="dir"):
    """Make sure ``path`` (absolute, inside the container) exists below ``root`` as a ``kind`` ('dir' or 'file'),
    reaching it one component at a time with O_NOFOLLOW and making what is missing: a symlink an image or a
    container left on the way is refused, so a mount on the returned host path lands inside the root, never
    on a host path it points to. Returns that host path."""
    parts = [p for p in posixpath.normpath("/" + path).split("/") if p]
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            want_dir = not last or kind == "dir"
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if want_dir:
                    os.mkdir(part, 0o755, dir_fd=fd)
                else:
                    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o644, dir_fd=fd))
                nxt = os.open(part, flags, dir_fd=fd)
            st = os.fstat(nxt)
            os.close(fd)
            fd = nxt
            if stat.S_ISLNK(st.st_mode) or (want_dir and not stat.S_ISDIR(st.st_mode)):
                raise MechanismError(f"{'/'.join(parts[:i + 1])} inside the root is "
                                     + ("a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory")
                                     + f": nothing is mounted through it (wanted /{'/'.join(parts)})",
                                     fix="remove or rename it in the image, or mount somewhere else")
    finally:
        os.close(fd)
    return root.rstrip("/") + "/" + "/".join(parts)


def setup_runtime_mounts(root, rec, proc=True, new_net=False, nodev=True):
    """Mount proc, sys, dev into ``root`` (in the caller's mount namespace); return the mount points.
    ``nodev``: /dev is a nodev tmpfs (a process that keeps every capability gets one without)."""
    done = []
    nosuid = kernel.MS_NOSUID | kernel.MS_NODEV
    for d in ("proc", "sys", "dev"):
        place_in_root(root, d)  # a symlink planted at /dev or /proc must not steer these mounts
    if proc:
        kernel.mount("proc", f"{root}/proc", "proc", nosuid | kernel.MS_NOEXEC, rec=rec)
        done.append(f"{root}/proc")
    # sysfs can only be mounted fresh when we own the network namespace; otherwise bind the host's.
    if new_net:
        kernel.mount("sysfs", f"{root}/sys", "sysfs", nosuid | kernel.MS_NOEXEC | kernel.MS_RDONLY, rec=rec)
    else:
        kernel.mount("/sys", f"{root}/sys", None, kernel.MS_BIND | kernel.MS_REC, rec=rec)
        kernel.mount(None, f"{root}/sys", None, kernel.MS_BIND | kernel.MS_REMOUNT | kernel.MS_RDONLY | nosuid
                     | kernel.MS_NOEXEC, rec=rec)
    done.append(f"{root}/sys")
    # nodev: a device node made in /dev by the container's root cannot be opened; the safe ones are bind
    # mounts of the host's own nodes (a bind mount keeps its source's flags)
    kernel.mount("tmpfs", f"{root}/dev", "tmpfs", nosuid if nodev else kernel.MS_NOSUID, "mode=755,size=65536k",
                 rec=rec)
    done.append(f"{root}/dev")
    for d in DEVICES:
        target = f"{root}/dev/{d}"
        open(target, "w").close()
        kernel.mount(f"/dev/{d}", target, None, kernel.MS_BIND, rec=rec)
    for d in ("pts", "shm"):
        os.mkdir(f"{root}/dev/{d}")
    kernel.mount("devpts", f"{root}/dev/pts", "devpts", kernel.MS_NOSUID | kernel.MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=620", rec=rec)
    kernel.mount("shm", f"{root}/dev/shm", "tmpfs", nosuid | kernel.MS_NOEXEC, "mode=1777,size=65536k", rec=rec)
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{root}/dev/{name}")
    rec.file("symlink", f"{root}/dev/{{{','.join(DEV_LINKS)}}}")
    return done


def host_has(program):
    return which(program) is not None
