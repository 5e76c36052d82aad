"""Device access of a cgroup: Docker's allow-list, enforced by the kernel's device controller.

A process in a restricted group may make any device node (``mknod`` is allowed, as in Docker) but may open
only the devices on :data:`DOCKER_ALLOW`: null, zero, full, random, urandom, tty, console, ptmx, the pts
terminals and /dev/net/tun. On cgroup v1 (and hybrid hosts) the list goes to the group's
``devices.deny`` / ``devices.allow`` in the ``devices`` hierarchy. On cgroup v2 the device controller is
a BPF program (``BPF_PROG_TYPE_CGROUP_DEVICE``) attached to the group: :func:`program` assembles it here,
instruction by instruction, and :func:`attach_v2` loads it with bpf(2). With the nodev mounts of
:mod:`labkit.agent.chroot`, a node a container makes for a host disk cannot be opened, twice over.
Standard library only.
"""
import ctypes
import os
import platform
import struct

from ..wire.errors import MechanismError
from . import kernel

# (type, major, minor, access): None is any; access letters r(ead) w(rite) m(knod), as devices.allow has them
DOCKER_ALLOW = (("c", None, None, "m"), ("b", None, None, "m"),
                ("c", 1, 3, "rwm"), ("c", 1, 5, "rwm"), ("c", 1, 7, "rwm"), ("c", 1, 8, "rwm"),
                ("c", 1, 9, "rwm"), ("c", 5, 0, "rwm"), ("c", 5, 1, "rwm"), ("c", 5, 2, "rwm"),
                ("c", 136, None, "rwm"), ("c", 10, 200, "rwm"))
POLICIES = {"docker": DOCKER_ALLOW}


def v1_lines(allow=DOCKER_ALLOW):
    """The devices.allow lines of an allow-list, e.g. 'c 1:3 rwm', 'c *:* m'."""
    star = lambda n: "*" if n is None else str(n)  # noqa: E731
    return [f"{t} {star(ma)}:{star(mi)} {acc}" for t, ma, mi, acc in allow]


# --- cgroup v2: a BPF device program ------------------------------------------------------------

BPF_PROG_LOAD, BPF_PROG_ATTACH = 5, 8
BPF_PROG_TYPE_CGROUP_DEVICE, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI = 15, 6, 2
DEV_TYPE = {"b": 1, "c": 2}                 # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR
ACCESS = {"m": 1, "r": 2, "w": 4}           # BPF_DEVCG_ACC_MKNOD, _READ, _WRITE
SYS_BPF = {"x86_64": 321, "aarch64": 280}


def _insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def program(allow=DOCKER_ALLOW):
    """The BPF program (bytes) that returns 1 for a device access on ``allow`` and 0 for any other.

    Its context is struct bpf_cgroup_dev_ctx {u32 access_type (access << 16 | type); u32 major; u32 minor}:
    r3..r6 hold type, access, major and minor; each rule is a block that jumps past its end at the first
    field that does not match (or when more access is asked than the rule gives) and otherwise returns 1;
    after the last block, 0."""
    ldxw, mov_x, mov_k, and_k, rsh_k, jne_k, exit_ = 0x61, 0xbf, 0xb7, 0x57, 0x77, 0x55, 0x95
    out = [_insn(ldxw, 2, 1, 0),                              # r2 = ctx->access_type
           _insn(mov_x, 3, 2), _insn(and_k, 3, imm=0xFFFF),   # r3 = type
           _insn(mov_x, 4, 2), _insn(rsh_k, 4, imm=16),       # r4 = access
           _insn(ldxw, 5, 1, 4),                              # r5 = major
           _insn(ldxw, 6, 1, 8)]                              # r6 = minor
    for t, major, minor, acc in allow:
        block = [("jne", 3, DEV_TYPE[t])]
        if major is not None:
            block.append(("jne", 5, major))
        if minor is not None:
            block.append(("jne", 6, minor))
        beyond = 7 & ~sum(ACCESS[a] for a in acc)
        block += [("insn", _insn(mov_x, 7, 4)), ("insn", _insn(and_k, 7, imm=beyond)), ("jne", 7, 0),
                  ("insn", _insn(mov_k, 0, imm=1)), ("insn", _insn(exit_))]
        for pos, (kind, a, *b) in enumerate(block):
            # a jump's offset counts from the next instruction: to the first one after this block
            out.append(_insn(jne_k, a, off=len(block) - pos - 1, imm=b[0]) if kind == "jne" else a)
    out += [_insn(mov_k, 0, imm=0), _insn(exit_)]
    return b"".join(out)


def _bpf(cmd, attr):
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise MechanismError(f"no bpf(2) number known for {platform.machine()}", fix="use an x86_64 or aarch64 target")
    libc = kernel.libc()
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(attr, 128)
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf, ctypes.c_uint(128))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def attach_v2(cgroup_dir, allow=DOCKER_ALLOW):
    """Load the device program and attach it to ``cgroup_dir`` (a cgroup v2 directory); returns its size in
    instructions. The attachment lives as long as the group: nothing to undo but removing the group."""
    code = program(allow)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("<IIQQIIQII16sII", BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8, ctypes.addressof(insns),
                       ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0, b"labkit_devices",
                       0, BPF_CGROUP_DEVICE)
    try:
        prog = _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        raise MechanismError(f"the kernel refused labkit's device program: {exc.strerror}"
                             + (f"; verifier: {log.value.decode(errors='replace')[-300:]}" if log.value else ""),
                             fix="this kernel lacks CONFIG_CGROUP_BPF or BPF is restricted; nodev mounts still "
                                 "keep containers from host devices") from None
    try:
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        os.close(prog)
        raise
    try:
        _bpf(BPF_PROG_ATTACH, struct.pack("<IIII", fd, prog, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI))
    except OSError as exc:
        raise MechanismError(f"attaching the device program to {cgroup_dir} failed: {exc.strerror}",
                             fix="see `labkit doctor`; nodev mounts still keep containers from host devices") from None
    finally:
        os.close(fd)
        os.close(prog)
    return len(code) // 8
