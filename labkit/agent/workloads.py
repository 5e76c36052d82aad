"""The probe and the workloads: busybox shell scripts that run unchanged on the host, in a container and in the VM.

Identical code in every case is what makes the comparison fair: the same static busybox binary runs
the same script as a plain process on the host, inside a labkit container (its image's busybox, or
the host's bind-mounted) and as the VM's guest (the script is copied into the VM's initramfs).

``PROBE_SH`` reports raw facts about where it runs (``key=value`` lines): kernel release and boot id,
PID 1's start time, mount ids, links, uid map, capabilities, and whether it may mount, load a module
or set the clock -- each tried for real in a way that changes nothing: a tmpfs mounted and unmounted
at once on a directory of its own, ``init_module`` on a file that is not a module (the kernel checks
the capability first, then refuses the file), ``adjtimex`` setting the tick to the value it has,
a kernel setting in /proc/sys and a kernel parameter in /sys written back with the values they hold
(when its root has no sysfs, it mounts one first if it may, as an intruder would).
The client turns those facts into what they mean next to the host's own (:func:`host_facts`, read
here in the host's namespaces): :func:`labkit.course.isolation.compare`.

Busybox's shell runs its own applets for plain command names (awk, dd, sed, ...), so the code is the
same binary's everywhere, never the host's GNU tools. ``BENCH_SH`` times one workload from inside, with microsecond stamps from busybox ``adjtimex``
(busybox's ``date`` has no nanoseconds), so start-up never counts in a workload's figure:
``LKB <name> <elapsed_us> <amount> <unit>``. Standard library only.
"""
import os
import re
import socket

from ..wire.errors import LabkitError
from .runner import pid_starttime, read_text

PROBE_SH = r"""
k() { printf '%s=%s\n' "$1" "$2"; }
k kernel "$(uname -r)"
k hostname "$(hostname)"
k uid "$(id -u)"
if [ -r /proc/self/stat ]; then
  k proc 1
  k boot_id "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
  k pid1_start "$(sed 's/.*) //' /proc/1/stat | cut -d' ' -f20)"
  k pids "$(ls /proc | grep -c '^[0-9]')"
  k mount_ids "$(cut -d' ' -f1 /proc/self/mountinfo | tr '\n' ' ')"
  for ns in mnt net pid user uts cgroup ipc; do k "ns_$ns" "$(readlink /proc/self/ns/$ns | tr -dc 0-9)"; done
  k cgroup_self "$(tr '\n' ';' < /proc/self/cgroup)"
  # the System V shared memory segment the host made with key $2: listed here only in the host's IPC namespace
  if [ -r /proc/sysvipc/shm ] && [ -n "$2" ]; then
    if awk -v key="$2" 'NR > 1 && $1 == key { found = 1 } END { exit !found }' /proc/sysvipc/shm; then k sees_shm 1
    else k sees_shm 0; fi
  fi
  k uid_map "$(tr -s ' ' < /proc/self/uid_map | sed 's/^ //' | tr '\n' ';')"
  k capeff "$(grep CapEff /proc/self/status | cut -f2)"
  k links "$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
  k mem_total_kb "$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
  k seccomp "$(grep '^Seccomp:' /proc/self/status | cut -f2)"
else
  k proc 0
fi
k marker "$(cat "$1" 2>/dev/null)"
d=
# /run/labkit/probe first: where it exists (the host's root) a mount left by a killed probe is labkit's to clean
for c in /run/labkit/probe /tmp /dev/shm /dev /; do if mkdir "$c/.lk-probe-$$" 2>/dev/null; then d=$c/.lk-probe-$$; break; fi; done
sysw() {  # write a kernel parameter in sysfs back with the value it has
  if v=$(cat "$1" 2>/dev/null) && [ -n "$v" ]; then
    if (echo "$v" > "$1") 2>/dev/null; then k can_write_sys 1; else k can_write_sys 0; fi
  fi
}
sysf=/sys/module/printk/parameters/time
if [ -n "$d" ]; then
  k can_mkdir 1
  if mount -t tmpfs lk-probe "$d" 2>/dev/null; then umount "$d"; k can_mount 1; else k can_mount 0; fi
  printf 'not a kernel module' > "$d/x.ko" 2>/dev/null
  err=$(insmod "$d/x.ko" 2>&1)
  rm -f "$d/x.ko"
  # no sysfs in its root? whoever may mount can bring one: try that too
  if [ ! -e $sysf ] && mount -t sysfs lk-probe-sys "$d" 2>/dev/null; then
    sysw "$d/module/printk/parameters/time"; umount "$d"
  else
    sysw $sysf
  fi
  rmdir "$d"
else
  k can_mkdir 0
  k can_mount untested
  err=$(insmod /proc/self/status 2>&1)
  sysw $sysf
fi
case "$err" in *"not permitted"*) k can_load_module 0 ;; *"not support"*|*"not implemented"*) k can_load_module nosys ;;
  *) k can_load_module 1 ;; esac
tick=$(adjtimex 2>/dev/null | sed -n 's/.*tick: *\([0-9]*\).*/\1/p')
if [ -n "$tick" ] && adjtimex -t "$tick" >/dev/null 2>&1; then k can_set_clock 1; else k can_set_clock 0; fi
f=/proc/sys/kernel/printk_ratelimit
if v=$(cat $f 2>/dev/null) && [ -n "$v" ]; then
  if (echo "$v" > $f) 2>/dev/null; then k can_write_proc_sys 1; else k can_write_proc_sys 0; fi
fi
"""

BENCH_SH = r"""
# a reading of the clock in microseconds (busybox adjtimex, tried three times). Its tv_usec holds nanoseconds when
# the kernel's STA_NANO status bit (8192) is set, as it is on a clock no NTP daemon disciplines: then it is divided.
# Nothing when adjtimex gave no reading, and then the script says so and prints no result: never a figure computed
# from a missing or misread stamp
now() { for _ in 1 2 3; do t=$(adjtimex | awk '/status:/{st=$2} /tv_sec/{s=$2} /tv_usec/{u=$2}
    END{if (s != "") { if (int(st / 8192) % 2 == 1) u = int(u / 1000); printf "%d%06d\n", s, u } }')
  [ -n "$t" ] && { echo "$t"; return; }; done; }
w=$1; n=$2; dir=${3:-/tmp}
bb=$(readlink /proc/$$/exe)  # the busybox running this script: the same binary forks below
t0=$(now)
[ -n "$t0" ] || { echo "adjtimex gave no clock reading" >&2; exit 3; }
case "$w" in
  cpu) awk -v n="$n" 'BEGIN{s=0; for(i=0;i<n;i++) s+=i%7; print s}' >/dev/null; unit=loops ;;
  memory) dd if=/dev/zero of=/dev/null bs=16M count=$((n/16)) 2>/dev/null; unit=MiB ;;
  syscalls) dd if=/dev/zero of=/dev/null bs=1 count="$n" 2>/dev/null; n=$((n*2)); unit=syscalls ;;
  fork) i=0; while [ $i -lt "$n" ]; do "$bb" true; i=$((i+1)); done; unit=processes ;;
  fileio) dd if=/dev/zero of="$dir/.lk-bench-io" bs=1M count="$n" conv=fsync 2>/dev/null; unit=MiB ;;
  *) echo "unknown workload $w" >&2; exit 2 ;;
esac
t1=$(now)
[ -n "$t1" ] || { echo "adjtimex gave no clock reading" >&2; exit 3; }
[ "$w" = fileio ] && rm -f "$dir/.lk-bench-io"
echo "LKB $w $((t1-t0)) $n $unit"
"""

# Network peers: the instance side listens with busybox nc; the host side (labkit.course.bench) drives it.
NET_SINK_SH = 'nc -l -p "$1" >/dev/null'
NET_ECHO_SH = 'nc -l -p "$1" -e cat'

WORKLOADS = ("cpu", "memory", "syscalls", "fork", "fileio")


def parse_bench(text):
    """The LKB lines of BENCH_SH's output: [{'workload', 'elapsed_s', 'amount', 'unit'}]."""
    out = []
    for m in re.finditer(r"^LKB (\S+) (-?\d+) (\d+) (\S+)\s*$", text or "", re.M):
        out.append({"workload": m.group(1), "elapsed_s": int(m.group(2)) / 1e6, "amount": int(m.group(3)),
                    "unit": m.group(4)})
    return out


def host_facts(marker=""):
    """The same facts, read by the agent in the host's namespaces: what a probe's view is compared with."""
    start = pid_starttime(1)
    start = "" if start is None else str(start)  # as the probe prints it
    try:
        links = sorted(n for _, n in socket.if_nameindex())
    except OSError:
        links = []
    mounts = {line.split()[0] for line in (read_text("/proc/self/mountinfo") or "").splitlines() if line.strip()}
    return {"kernel": os.uname().release, "hostname": os.uname().nodename,
            "boot_id": (read_text("/proc/sys/kernel/random/boot_id") or "").strip(), "pid1_start": start,
            "mount_ids": sorted(mounts), "links": links, "marker": marker,
            "cgroup_self": (read_text("/proc/self/cgroup") or "").strip().replace("\n", ";"),
            "ns": {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in ("mnt", "net", "pid", "user", "uts", "cgroup",
                                                                      "ipc")}}


PROBE_DIR = "/run/labkit/probe"


def probe_context():
    """What the host side needs to run the probe: the script, the host's busybox, a fresh marker file
    (a host file only the host can see), a System V shared memory segment made on the host (``shm_key``: an
    IPC object only the host's IPC namespace lists) and the host's own facts to compare with."""
    import secrets
    from . import kernel, rootfs
    os.makedirs(PROBE_DIR, exist_ok=True)
    token = secrets.token_hex(8)
    marker = f"{PROBE_DIR}/marker-{token}"
    with open(marker, "w") as f:  # first: probe_done and cleanup find the segment by the marker's name
        f.write(token + "\n")
    key = shm_key(token)
    try:
        shmid = kernel.shm_create(key)
    except LabkitError:
        key = None  # (a key taken already: the probe then reports no IPC fact, the matrix says why)
    else:
        with open(marker, "a") as f:  # the segment this probe made, by its id: the only one probe_done removes
            f.write(f"shm {shmid}\n")
    host = dict(host_facts(token), shm_key=key)
    return {"script": PROBE_SH, "busybox": rootfs.busybox_or_fail(), "marker": marker, "shm_key": key, "host": host}


def shm_key(token):
    """The System V key of a probe's segment, from its marker's token: positive and never 0 (IPC_PRIVATE), so
    /proc/sysvipc/shm prints it as this very number."""
    return int(token[:7], 16) | 1


MARKER = re.compile(re.escape(PROBE_DIR) + r"/marker-([0-9a-f]{16})")


def probe_done(marker):
    """Remove the marker file probe_context made and its shared memory segment (only a file of that shape, in
    that directory, and the segment with the key its name gives)."""
    m = MARKER.fullmatch(str(marker))
    if m:
        _remove_probe_segment(marker, shm_key(m.group(1)))
        if os.path.exists(marker):
            os.unlink(marker)
    return {"removed": marker}


def _remove_probe_segment(marker, key):
    """The segment the marker names (``shm ID``), removed only while /proc/sysvipc/shm still shows it with the
    probe's key and root as its creator (an id reused by someone else's segment is left alone)."""
    from . import kernel
    text = read_text(marker) or ""
    ids = [int(w[1]) for w in (ln.split() for ln in text.splitlines()) if len(w) == 2 and w[0] == "shm" and w[1].isdigit()]
    for shmid in ids:
        for row in (read_text("/proc/sysvipc/shm") or "").splitlines()[1:]:
            f = row.split()
            if len(f) > 9 and f[0] == str(key) and f[1] == str(shmid) and f[9] == "0":
                try:
                    kernel.shm_remove(shmid)
                except LabkitError:
                    pass


def leftover_probes():
    """Markers (and so segments) of probes whose probe_done never ran (a killed notebook): for labkit cleanup."""
    try:
        return sorted(p for p in (f"{PROBE_DIR}/{n}" for n in os.listdir(PROBE_DIR)) if MARKER.fullmatch(p))
    except OSError:
        return []


def host_disk():
    """The host's root disk as MAJOR:MINOR (None when / is not on a block device, e.g. an overlay or a
    virtual root) and whether the host's own root may read a block of it: some machines refuse raw disk
    reads even to root, and then no container can do better."""
    dev = None
    for line in (read_text("/proc/self/mountinfo") or "").splitlines():
        f = line.split()
        if len(f) > 4 and f[4] == "/":
            dev = f[2]
    if not dev or not re.fullmatch(r"\d+:\d+", dev) or not os.path.exists(f"/sys/dev/block/{dev}"):
        return {"dev": None, "host_can_read": False, "why": "the host's root is not on a block device"}
    os.makedirs(PROBE_DIR, mode=0o700, exist_ok=True)
    node = f"{PROBE_DIR}/disk-{os.getpid()}-{os.urandom(4).hex()}"
    major, minor = (int(x) for x in dev.split(":"))
    try:
        os.mknod(node, 0o600 | 0o060000, os.makedev(major, minor))
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.read(fd, 512)
        finally:
            os.close(fd)
        return {"dev": dev, "host_can_read": True, "why": ""}
    except OSError as exc:
        return {"dev": dev, "host_can_read": False, "why": exc.strerror}
    finally:
        if os.path.lexists(node):
            os.unlink(node)


def setuid_left(root, name):
    """Judge, from the host, the set-user-ID file SUID_SH left at ``root``/``name``, then remove it: could an
    ordinary host user (nobody) reach and run it as the host's root? Returns {'escaped', 'why'}."""
    from ..wire.specs import rootfs_path
    if not re.fullmatch(r"/\.lk-suid-\d+", str(name)):
        return {"escaped": False, "why": f"not a file SUID_SH makes: {name!r}"}
    path = rootfs_path(root) + name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"escaped": False, "why": "the file is not there (a root of its own, unseen from the host?)"}
    try:
        import stat as st_mod
        if not st_mod.S_ISREG(st.st_mode) or not st.st_mode & st_mod.S_ISUID:
            return {"escaped": False, "why": "the file is not set-user-ID on the host"}
        if st.st_uid != 0:
            return {"escaped": False, "why": f"it is set-user-ID to uid {st.st_uid} on the host, not root "
                                             "(root in a user namespace is an ordinary user outside)"}
        if os.statvfs(path).f_flag & os.ST_NOSUID:
            return {"escaped": False, "why": "its filesystem is mounted nosuid"}
        reach = _as_nobody_can_exec(path)
        if reach is not True:
            return {"escaped": False, "why": f"a host user cannot reach it: {reach}"}
        return {"escaped": True, "why": f"any host user can run {path} as the host's root"}
    finally:
        os.unlink(path)


def _as_nobody_can_exec(path):
    """True when uid/gid 65534 may execute ``path`` (every directory on the way included), else the reason."""
    from .runner import run
    if run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-x", path], check=False).ok:
        return True
    d = os.path.dirname(path)
    while d not in ("/", ""):
        mode = os.stat(d).st_mode & 0o777
        if not mode & 0o001:
            return f"{d} is mode {oct(mode)[2:]} (no way through for other users)"
        d = os.path.dirname(d)
    return "permission denied"
