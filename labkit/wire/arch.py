"""Per-architecture tables: capability names (bit order of CapEff) and system call numbers.

Used by both sides: the client validates a ``cap_keep`` or a seccomp deny-list against them, the agent
drops capabilities and assembles a seccomp filter from them (:mod:`labkit.agent.kernel`). x86_64 and
aarch64 (Apple Silicon hosts run arm64 VMs); nothing else assumes one. Standard library only.
"""
from .errors import InvalidSpec

CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
        "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
        "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
        "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
        "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE")
# what Docker leaves a container by default (moby's oci/caps/defaults.go lists the same fourteen)
DOCKER_DEFAULT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                       "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                       "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")
# the syscalls a seccomp filter can name, per architecture (aarch64 has only the *at forms)
SYSCALLS = {
    "x86_64": {"mkdir": 83, "mkdirat": 258, "chmod": 90, "fchmod": 91, "fchmodat": 268, "mount": 165,
               "umount2": 166, "unshare": 272, "sethostname": 170, "ptrace": 101, "reboot": 169,
               "init_module": 175, "finit_module": 313, "settimeofday": 164, "clock_settime": 227,
               "adjtimex": 159, "kill": 62, "socket": 41, "personality": 135, "keyctl": 250, "chroot": 161,
               "pivot_root": 155, "setns": 308, "bpf": 321, "unlink": 87, "unlinkat": 263},
    "aarch64": {"mkdirat": 34, "fchmod": 52, "fchmodat": 53, "mount": 40, "umount2": 39, "unshare": 97,
                "sethostname": 161, "ptrace": 117, "reboot": 142, "init_module": 105, "finit_module": 273,
                "settimeofday": 170, "clock_settime": 112, "adjtimex": 171, "kill": 129, "socket": 198,
                "personality": 92, "keyctl": 219, "chroot": 51, "pivot_root": 41, "setns": 268, "bpf": 280,
                "unlinkat": 35},
}
# what a student means by a name -> every syscall that does it (libc may use either form)
SYSCALL_FAMILIES = {"mkdir": ("mkdir", "mkdirat"), "chmod": ("chmod", "fchmod", "fchmodat"),
                    "unlink": ("unlink", "unlinkat"), "init_module": ("init_module", "finit_module"),
                    "settimeofday": ("settimeofday", "clock_settime", "adjtimex")}




def normalize_caps(names):
    out = []
    for n in names:
        name = str(n).upper()
        name = name if name.startswith("CAP_") else "CAP_" + name
        if name not in CAPS:
            raise InvalidSpec(f"unknown capability {n!r}", fix="e.g. 'NET_BIND_SERVICE'; see `man 7 capabilities`")
        out.append(name)
    return tuple(sorted(set(out)))


def syscall_numbers(names, machine):
    """Syscall numbers for ``names`` on ``machine``; a name stands for its whole family (mkdir, mkdirat)."""
    table = SYSCALLS.get(machine)
    if table is None:
        raise InvalidSpec(f"no seccomp table for {machine}", fix="use an x86_64 or aarch64 target")
    nums = []
    for name in names:
        family = [n for n in SYSCALL_FAMILIES.get(name, (name,)) if n in table]
        if not family:
            raise InvalidSpec(f"unknown syscall {name!r} for {machine}",
                              fix="choose one of " + ", ".join(sorted(table)))
        nums += [table[n] for n in family]
    return sorted(set(nums))
