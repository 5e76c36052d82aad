"""Thin, recorded wrappers around the Linux syscalls that containers are made of.

unshare, setns, mount, umount2, pivot_root, chroot, sethostname and bringing an interface up: each
call is made through ctypes (the agent must run on a bare python3 3.9+, where ``os.unshare`` does
not exist yet), appended to a :class:`labkit.agent.runner.Recorder` with its arguments spelled the
way the man page does, and turned into :class:`labkit.wire.errors.MechanismError` naming the call and
errno when the kernel refuses. Standard library only.
"""
import ctypes
import ctypes.util
import errno as _errno
import fcntl
import os
import socket
import struct
import time

from ..wire.errors import MechanismError
from ..wire.arch import CAPS, syscall_numbers

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: namespace name (as in /proc/<pid>/ns) -> clone flag
NS_FLAGS = {"mnt": CLONE_NEWNS, "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC, "pid": CLONE_NEWPID,
            "net": CLONE_NEWNET, "user": CLONE_NEWUSER, "cgroup": CLONE_NEWCGROUP}
FLAG_NAMES = {v: "CLONE_NEW" + ("NS" if k == "mnt" else k.upper()) for k, v in NS_FLAGS.items()}

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
_MS_NAMES = [(MS_RDONLY, "MS_RDONLY"), (MS_NOSUID, "MS_NOSUID"), (MS_NODEV, "MS_NODEV"),
             (MS_NOEXEC, "MS_NOEXEC"), (MS_REMOUNT, "MS_REMOUNT"), (MS_BIND, "MS_BIND"),
             (MS_REC, "MS_REC"), (MS_PRIVATE, "MS_PRIVATE"), (MS_SLAVE, "MS_SLAVE")]

_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _flags_text(flags, names):
    parts = [name for bit, name in names if flags & bit]
    return "|".join(parts) if parts else "0"


def clone_flags_text(flags):
    return _flags_text(flags, sorted(FLAG_NAMES.items()))


def _call(rec, name, shown_args, fn, fix=None):
    start = time.perf_counter()
    res = fn()
    err = ctypes.get_errno() if res == -1 else 0
    if rec is not None:
        rec.syscall(name, shown_args, res, err, time.perf_counter() - start)
    if res == -1:
        raise MechanismError(f"{name}({', '.join(map(str, shown_args))}) failed: "
                             f"{_errno.errorcode.get(err, err)} ({os.strerror(err)})",
                             fix=fix or "", call=name, errno=err)
    return res


def wait_exit_code(pid):
    """Wait for child ``pid``; its exit status as a shell reports it (128 + N when killed by signal N)."""
    _, status = os.waitpid(pid, 0)  # retried on EINTR by Python itself (PEP 475)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def unshare(flags, rec=None):
    return _call(rec, "unshare", [clone_flags_text(flags)], lambda: libc().unshare(flags),
                 fix="namespaces need root (or a user namespace first) and a kernel built with them; "
                     "see `labkit doctor`")


def setns(fd, nstype, rec=None, shown=""):
    return _call(rec, "setns", [shown or fd, clone_flags_text(nstype)], lambda: libc().setns(fd, nstype))


def bind_flags(path):
    """The per-mount flags (MS_RDONLY, NOSUID, NODEV, NOEXEC, the atime ones) of the mount holding ``path``:
    a bind remount must repeat the ones it keeps (the kernel refuses to drop a locked one)."""
    f = os.statvfs(path).f_flag
    keep = 0
    for st, ms in ((os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
                   (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048),
                   (os.ST_RELATIME, 1 << 21)):
        if f & st:
            keep |= ms
    return keep


def remount_bind(path, add, rec=None):
    """Remount the bind mount at ``path`` with ``add`` (e.g. MS_NODEV, MS_RDONLY) on top of its flags."""
    return mount(None, path, None, MS_BIND | MS_REMOUNT | bind_flags(path) | add, rec=rec)


def mount(source, target, fstype, flags=0, data=None, rec=None):
    shown = [repr(source), repr(str(target)), repr(fstype), _flags_text(flags, _MS_NAMES)]
    if data:
        shown.append(repr(data))
    enc = (lambda s: None if s is None else str(s).encode())
    return _call(rec, "mount", shown,
                 lambda: libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)))


def umount2(target, flags=0, rec=None):
    return _call(rec, "umount2", [repr(str(target)), "MNT_DETACH" if flags & MNT_DETACH else str(flags)],
                 lambda: libc().umount2(str(target).encode(), flags))


SYS_pivot_root = {"x86_64": 155, "aarch64": 41, "armv7l": 218, "i686": 217, "riscv64": 41,
                  "ppc64le": 203, "s390x": 217}


def pivot_root(new_root, put_old, rec=None):
    nr = SYS_pivot_root.get(os.uname().machine)
    if nr is None:
        raise MechanismError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    return _call(rec, "pivot_root", [repr(new_root), repr(put_old)],
                 lambda: libc().syscall(ctypes.c_long(nr), new_root.encode(), put_old.encode()))


def _os_call(rec, name, shown, fn):
    start = time.perf_counter()
    try:
        fn()
    except OSError as exc:
        if rec is not None:
            rec.syscall(name, shown, -1, exc.errno, time.perf_counter() - start)
        raise MechanismError(f"{name}({', '.join(shown)}) failed: {exc.strerror}", call=name,
                             errno=exc.errno) from None
    if rec is not None:
        rec.syscall(name, shown, duration=time.perf_counter() - start)


def chroot(path, rec=None):
    _os_call(rec, "chroot", [repr(str(path))], lambda: os.chroot(path))


def chdir(path, rec=None):
    _os_call(rec, "chdir", [repr(str(path))], lambda: os.chdir(path))


def mkdir(path, rec=None, mode=0o755):
    _os_call(rec, "mkdir", [repr(str(path)), oct(mode)], lambda: os.mkdir(path, mode))


def sethostname(name, rec=None):
    data = name.encode()
    return _call(rec, "sethostname", [repr(name), len(data)], lambda: libc().sethostname(data, len(data)))


def setresuid(uid, rec=None):
    _os_call(rec, "setresuid", [str(uid)] * 3, lambda: os.setresuid(uid, uid, uid))


def setresgid(gid, rec=None):
    _os_call(rec, "setresgid", [str(gid)] * 3, lambda: os.setresgid(gid, gid, gid))


def clean_for_exec(keep=None):
    """Just before exec, in a process of labkit's that becomes a program of the container: every signal's
    disposition back to the default and none blocked, as a program expects to start (ignored signals and the
    mask survive exec; Python ignores SIGPIPE and SIGXFSZ, and whoever started labkit's daemon or supervisor may
    have ignored more, as job-control shells ignore SIGTTOU), and no descriptor above stdio but ``keep`` (every
    one labkit holds is close-on-exec already: this closes any that is not)."""
    import signal
    top = os.sysconf("SC_OPEN_MAX")
    if keep is None:
        os.closerange(3, top)
    else:
        os.closerange(3, keep)
        os.closerange(keep + 1, top)
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass  # (signals the C library keeps for itself)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


TIOCSPTLCK = 0x40045431   # _IOW('T', 0x31, int): lock or unlock a pseudo-terminal's slave
TIOCGPTPEER = 0x5441      # _IO('T', 0x41): open the slave of this master (Linux 4.13), no path looked up
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414


def write_all(fd, data):
    """All of ``data`` to ``fd`` (a pipe, a terminal's master or a file takes what fits; the rest follows)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def set_winsize(fd, rows, cols):
    """A terminal's window size (the process in its foreground gets SIGWINCH), set on its master or its slave."""
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def console_here(console_fd, rec=None):
    """`docker run -t` inside the container, as runc's console socket does it: a pseudo-terminal from this
    root's /dev/ptmx (the container's own devpts, so the terminal is /dev/pts/0 inside), its master sent over
    the socket ``console_fd`` to whoever holds the other end (the supervisor, or the daemon for an exec), its
    slave made stdin, stdout and stderr, and this process the leader of a session whose controlling terminal it is."""
    holder = {}

    def make():
        holder["master"] = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        fcntl.ioctl(holder["master"], TIOCSPTLCK, struct.pack("i", 0))
        set_winsize(holder["master"], 24, 80)
        holder["slave"] = fcntl.ioctl(holder["master"], TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    _os_call(rec, "open", ["'/dev/ptmx'", "O_RDWR|O_NOCTTY", "then TIOCSPTLCK, TIOCGPTPEER"], make)
    console = socket.socket(fileno=console_fd)
    try:
        _os_call(rec, "sendmsg", [f"console socket {console_fd}", "SCM_RIGHTS master"],
                 lambda: socket.send_fds(console, [b"pty"], [holder["master"]]))
    finally:
        console.detach()
        os.close(console_fd)
        os.close(holder["master"])
    for fd in (0, 1, 2):
        os.dup2(holder["slave"], fd)
    if holder["slave"] > 2:
        os.close(holder["slave"])
    os.setsid()
    _os_call(rec, "ioctl", ["0", "TIOCSCTTY", "0"], lambda: fcntl.ioctl(0, TIOCSCTTY, 0))


def receive_console(sock, timeout=30):
    """The other end of :func:`console_here`: the master it sends (an fd), or None when it never came."""
    sock.settimeout(timeout)
    try:
        _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    except OSError:
        return None
    return fds[0] if fds else None


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


IPC_CREAT, IPC_EXCL, IPC_RMID = 0o1000, 0o2000, 0


def shm_create(key, size=4096, rec=None):
    """A System V shared memory segment with ``key`` (exclusive: never one that exists already): its id."""
    return _call(rec, "shmget", [hex(key), size, "IPC_CREAT|IPC_EXCL|0600"],
                 lambda: libc().shmget(ctypes.c_int(key), ctypes.c_size_t(size), IPC_CREAT | IPC_EXCL | 0o600))


def shm_remove(shmid, rec=None):
    """Remove the System V shared memory segment ``shmid`` (whoever holds it keeps it until detaching)."""
    return _call(rec, "shmctl", [shmid, "IPC_RMID"], lambda: libc().shmctl(ctypes.c_int(shmid), IPC_RMID, None))


def link_up(name, rec=None):
    """ioctl(SIOCSIFFLAGS, IFF_UP) on an interface of the caller's network namespace."""
    start = time.perf_counter()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | IFF_UP))
    if rec is not None:
        rec.syscall("ioctl", ["SIOCSIFFLAGS", repr(name), "IFF_UP"], duration=time.perf_counter() - start)


def ns_inode(pid, name):
    """Inode number of /proc/<pid>/ns/<name> (the namespace's identity), or None."""
    try:
        link = os.readlink(f"/proc/{pid}/ns/{name}")  # "uts:[4026531838]" (readlink needs less than stat)
        return int(link[link.index("[") + 1:-1])
    except (OSError, ValueError):
        return None


# -- capabilities and seccomp (lab 08) --------------------------------------------------------------
PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 23, 24, 38, 22
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def drop_capabilities(keep, rec=None):
    """Drop every capability not in ``keep`` from the bounding set (execve then cannot give it back,
    not even to root) and clear the ambient set."""
    lc = libc()
    keep = set(keep)
    dropped = []
    for num, name in enumerate(CAPS):
        if name in keep:
            continue
        if lc.prctl(PR_CAPBSET_READ, num, 0, 0, 0) == 1:
            _call(None, "prctl", ["PR_CAPBSET_DROP", name], lambda n=num: lc.prctl(PR_CAPBSET_DROP, n, 0, 0, 0))
            dropped.append(name)
    lc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if rec is not None:
        rec.syscall("prctl", ["PR_CAPBSET_DROP", f"{len(dropped)} capabilities"], dropped=dropped, kept=sorted(keep))
    return dropped


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_numbers(names, machine=None):
    """Syscall numbers for ``names`` on this CPU; unknown names are an InvalidSpec that lists the known."""
    return syscall_numbers(names, machine or os.uname().machine)


def seccomp_deny(names, rec=None):
    """Install a seccomp BPF filter: the named syscalls fail with EPERM, everything else is allowed.

    Sets no_new_privs first (the kernel demands it of a process without CAP_SYS_ADMIN). The program:
    load the architecture (a call made through another ABI is refused), load the syscall number,
    compare it with each denied number."""
    machine = os.uname().machine
    nums = seccomp_numbers(names, machine)
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    prog = [(ld_w_abs, 0, 0, 4),                                      # A = seccomp_data.arch
            (jeq_k, 1, 0, AUDIT_ARCH[machine]),                       # our arch? skip the next line
            (ret_k, 0, 0, SECCOMP_RET_ERRNO | _errno.EPERM),          # another ABI: refuse
            (ld_w_abs, 0, 0, 0)]                                      # A = seccomp_data.nr
    for i, nr in enumerate(nums):
        prog.append((jeq_k, len(nums) - i, 0, nr))                    # match: jump to the EPERM return
    prog += [(ret_k, 0, 0, SECCOMP_RET_ALLOW), (ret_k, 0, 0, SECCOMP_RET_ERRNO | _errno.EPERM)]
    arr = (_SockFilter * len(prog))(*[_SockFilter(*p) for p in prog])
    fprog = _SockFprog(len(prog), arr)
    lc = libc()
    _call(rec, "prctl", ["PR_SET_NO_NEW_PRIVS", 1], lambda: lc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    _call(rec, "prctl", ["PR_SET_SECCOMP", "SECCOMP_MODE_FILTER", f"deny {', '.join(names)} -> EPERM ({len(prog)} BPF instructions)"],
          lambda: lc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0))
    return nums
