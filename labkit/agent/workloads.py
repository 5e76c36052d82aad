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
``compare(facts, host)`` turns those facts into what they mean relative to the host (here, in the
agent, which runs in the host's namespaces).

Busybox's shell runs its own applets for plain command names (awk, dd, sed, ...), so the code is the
same binary's everywhere, never the host's GNU tools. ``BENCH_SH`` times one workload from inside, with microsecond stamps from busybox ``adjtimex``
(busybox's ``date`` has no nanoseconds), so start-up never counts in a workload's figure:
``LKB <name> <elapsed_us> <amount> <unit>``. Standard library only.
"""
import os
import re
import socket

from .runner import read_text

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
  for ns in mnt net pid user uts cgroup; do k "ns_$ns" "$(readlink /proc/self/ns/$ns | tr -dc 0-9)"; done
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

# Two attempts of lab 08 that the probe above does not make, each harmless and undone at once.
# DISK_SH: make a device node with the numbers of the host's root disk ($1 = MAJOR:MINOR) and read one block
# from it (nothing is written). SUID_SH: leave a set-user-ID copy of its own shell at the top of its root,
# owned by its root; the host side then asks whether an ordinary host user could run it as the host's root
# (:func:`setuid_left`), and removes it.
DISK_SH = r"""
k() { printf '%s=%s\n' "$1" "$2"; }
d=
for c in /tmp /dev /; do if mkdir "$c/.lk-disk-$$" 2>/dev/null; then d=$c/.lk-disk-$$; break; fi; done
if [ -z "$d" ]; then k disk nodir; exit 0; fi
if err=$(mknod "$d/disk" b "${1%:*}" "${1#*:}" 2>&1); then
  if err=$(dd if="$d/disk" of=/dev/null bs=512 count=1 2>&1); then k disk read; else k disk open; k why "$err"; fi
  rm -f "$d/disk"
else
  k disk mknod; k why "$err"
fi
rmdir "$d"
"""

SUID_SH = r"""
k() { printf '%s=%s\n' "$1" "$2"; }
f=/.lk-suid-$$
if err=$( { cp "$(readlink /proc/$$/exe 2>/dev/null || echo /bin/busybox)" "$f" && chown 0:0 "$f" && chmod 4755 "$f"; } 2>&1); then
  k suid "$f"
else
  rm -f "$f" 2>/dev/null; k suid refused; k why "$err"
fi
"""

BENCH_SH = r"""
now() { adjtimex | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf "%d%06d\n", s, u}'; }
w=$1; n=$2; dir=${3:-/tmp}
bb=$(readlink /proc/$$/exe)  # the busybox running this script: the same binary forks below
t0=$(now)
case "$w" in
  cpu) awk -v n="$n" 'BEGIN{s=0; for(i=0;i<n;i++) s+=i%7; print s}' >/dev/null; unit=loops ;;
  memory) dd if=/dev/zero of=/dev/null bs=16M count=$((n/16)) 2>/dev/null; unit=MiB ;;
  syscalls) dd if=/dev/zero of=/dev/null bs=1 count="$n" 2>/dev/null; n=$((n*2)); unit=syscalls ;;
  fork) i=0; while [ $i -lt "$n" ]; do "$bb" true; i=$((i+1)); done; unit=processes ;;
  fileio) dd if=/dev/zero of="$dir/.lk-bench-io" bs=1M count="$n" conv=fsync 2>/dev/null; unit=MiB ;;
  *) echo "unknown workload $w" >&2; exit 2 ;;
esac
t1=$(now)
[ "$w" = fileio ] && rm -f "$dir/.lk-bench-io"
echo "LKB $w $((t1-t0)) $n $unit"
"""

# Network peers: the instance side listens with busybox nc; the host side (labkit.bench) drives it.
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


def parse_probe(text):
    facts = {}
    for line in (text or "").splitlines():
        key, sep, value = line.strip("\r").partition("=")
        if sep and re.fullmatch(r"[a-z_0-9]+", key):
            facts[key] = value.strip()
    return facts


def host_facts(marker=""):
    """The same facts, read by the agent in the host's namespaces: what a probe's view is compared with."""
    stat = read_text("/proc/1/stat") or ""
    start = stat.rsplit(") ", 1)[-1].split()[19] if ") " in stat else ""
    try:
        links = sorted(n for _, n in socket.if_nameindex())
    except OSError:
        links = []
    mounts = {line.split()[0] for line in (read_text("/proc/self/mountinfo") or "").splitlines() if line.strip()}
    return {"kernel": os.uname().release, "hostname": os.uname().nodename,
            "boot_id": (read_text("/proc/sys/kernel/random/boot_id") or "").strip(), "pid1_start": start,
            "mount_ids": sorted(mounts), "links": links, "marker": marker,
            "ns": {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in ("mnt", "net", "pid", "user", "uts", "cgroup")}}


CAP_NAMES = {21: "CAP_SYS_ADMIN", 16: "CAP_SYS_MODULE", 25: "CAP_SYS_TIME", 19: "CAP_SYS_PTRACE", 12: "CAP_NET_ADMIN"}


def compare(facts, host, limits=None, vm=False):
    """What a probe's facts mean: {column: (1 if it reaches or shares the host's, else 0, reason)}.

    ``limits``: the memory and pids limits of the cgroup the probe ran in (None: unlimited);
    ``vm``: the facts come from a guest kernel (its root is the guest's root, not the host's)."""
    limits = limits or {}
    proc = facts.get("proc") == "1"
    same_kernel = facts.get("boot_id") == host["boot_id"] if facts.get("boot_id") else facts.get("kernel") == host["kernel"]
    out = {}
    if not proc:
        out["host PIDs"] = (0, "no /proc inside: ps shows nothing (hidden, not isolated)")
    elif facts.get("pid1_start") == host["pid1_start"] and same_kernel:
        out["host PIDs"] = (1, f"its /proc lists the host's processes ({facts.get('pids')} PIDs, the host's PID 1)")
    else:
        out["host PIDs"] = (0, f"its /proc shows {facts.get('pids')} PID(s), its own")
    out["hostname"] = (int(facts.get("hostname") == host["hostname"]), f"hostname {facts.get('hostname')!r}")
    def shared_ns(name):
        # namespace inodes are only comparable within one kernel (every kernel's first ones are alike)
        value = facts.get(f"ns_{name}")
        return bool(value) and same_kernel and int(value) == host["ns"][name]

    ids = set((facts.get("mount_ids") or "").split())
    shared_mounts = shared_ns("mnt")
    if shared_mounts:
        out["mounts"] = (1, "the host's mount namespace" + ("" if ids & set(host["mount_ids"]) else
                                                            f" (it sees only the {len(ids)} mount(s) under its root)"))
    else:
        out["mounts"] = (0, f"{len(ids)} mounts of its own" if proc else "no /proc: mount table not readable")
    links = sorted((facts.get("links") or "").split())
    shared_links = shared_ns("net")
    out["links"] = (int(shared_links), "links: " + (", ".join(links) or "none visible")
                    + (" (the host's network namespace)" if shared_links else ""))
    uid_map = facts.get("uid_map", "")
    if vm:
        out["users"] = (0, f"uid {facts.get('uid')} is the guest kernel's root, not the host's")
    elif not proc:
        out["users"] = (int(facts.get("uid") == "0"), f"uid {facts.get('uid')}; no /proc: uid_map not readable")
    else:
        host_root = shared_ns("user") and facts.get("uid") == "0"
        out["users"] = (int(host_root), f"uid {facts.get('uid')}, uid_map {uid_map.rstrip(';')!r}"
                        + (" (the host's root)" if host_root else " (not the host's root)"))
    seen = bool(host.get("marker")) and facts.get("marker") == host["marker"]
    out["files"] = (int(seen), "reads a file the host just wrote" if seen else "cannot see the host's files")
    out["kernel"] = (int(same_kernel), f"kernel {facts.get('kernel')}, boot id {(facts.get('boot_id') or '?')[:8]}"
                     + (" (the host's kernel)" if same_kernel else " (a kernel of its own)"))
    can_mount = facts.get("can_mount") == "1"
    out["mount (host)"] = (int(can_mount and shared_mounts),
                           "mounted a tmpfs in the host's mount namespace" if can_mount and shared_mounts else
                           "mounted a tmpfs in a mount table of its own" if can_mount else
                           "no writable directory to try a mount on" if facts.get("can_mount") == "untested"
                           else "mount(2): not permitted")
    mod = facts.get("can_load_module")
    if mod == "nosys":
        try:
            has_cap = bool(int(facts.get("capeff", "0"), 16) >> 16 & 1) and shared_ns("user")
        except ValueError:
            has_cap = False
        out["load module"] = (int(has_cap and same_kernel), "this kernel has no module loading (init_module: ENOSYS); "
                              + ("it holds CAP_SYS_MODULE in the host's user namespace, so it could on a kernel "
                                 "that has it" if has_cap else "nor does it hold CAP_SYS_MODULE in the host's user namespace"))
    else:
        mod = mod == "1"
        out["load module"] = (int(mod and same_kernel),
                              "init_module passed the permission check: it could load code into the host's kernel"
                              if mod and same_kernel else "could load a module, into its own kernel only" if mod
                              else "init_module: not permitted")
    clock = facts.get("can_set_clock") == "1"
    out["set clock"] = (int(clock and same_kernel), "adjtimex(ADJ_TICK) allowed: it can set the host's clock"
                        if clock and same_kernel else "can set its own kernel's clock only" if clock
                        else "adjtimex: not permitted (no CAP_SYS_TIME in the host's user namespace)")
    for col, key, what, missing, refused in (
            ("write /proc/sys", "can_write_proc_sys", "a kernel setting in /proc/sys", "no /proc/sys to write to",
             "/proc/sys: permission denied (the setting belongs to the host's root)"),
            ("write /sys", "can_write_sys", "a kernel parameter in /sys", "no sysfs to write to, and it may not mount one",
             "/sys: read-only or permission denied")):
        w = facts.get(key)
        if w is None:
            out[col] = (0, missing)
        else:
            w = w == "1"
            out[col] = (int(w and same_kernel), f"wrote {what}: the host's kernel's" if w and same_kernel
                        else f"wrote {what} of its own kernel" if w else refused)
    mem_kb = facts.get("mem_total_kb")
    if vm:
        out["memory"] = (0, f"bounded by the VM's RAM ({int(mem_kb) // 1024 if mem_kb else '?'} MiB seen by its kernel)")
    elif limits.get("memory"):
        out["memory"] = (0, f"cgroup memory limit {limits['memory']} bytes")
    else:
        out["memory"] = (1, "no memory limit: it can take all of the host's memory")
    if vm:
        out["PIDs"] = (0, "the guest's processes are the guest's; the host sees one qemu process")
    elif limits.get("pids"):
        out["PIDs"] = (0, f"cgroup pids limit {limits['pids']}")
    else:
        out["PIDs"] = (1, "no pids limit: a fork bomb fills the host's process table")
    return out


def caps_text(capeff):
    """A CapEff hex mask as the names of a few capabilities that matter for escaping."""
    try:
        mask = int(capeff, 16)
    except (TypeError, ValueError):
        return "?"
    n = bin(mask).count("1")
    named = [name for bit, name in sorted(CAP_NAMES.items()) if mask >> bit & 1]
    return f"{n} capabilities" + (f" incl. {', '.join(named)}" if named else "")


PROBE_DIR = "/run/labkit/probe"


def probe_context():
    """What the host side needs to run the probe: the script, the host's busybox, a fresh marker file
    (a host file only the host can see) and the host's own facts to compare with."""
    import secrets
    from . import rootfs
    os.makedirs(PROBE_DIR, exist_ok=True)
    token = secrets.token_hex(8)
    marker = f"{PROBE_DIR}/marker-{token}"
    with open(marker, "w") as f:
        f.write(token + "\n")
    return {"script": PROBE_SH, "busybox": rootfs.busybox_or_fail(), "marker": marker, "host": host_facts(token)}


def probe_done(marker):
    """Remove the marker file probe_context made (only a file of that shape, in that directory)."""
    if re.fullmatch(re.escape(PROBE_DIR) + r"/marker-[0-9a-f]{16}", str(marker)) and os.path.exists(marker):
        os.unlink(marker)
    return {"removed": marker}


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
    from ..specs import rootfs_path
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
