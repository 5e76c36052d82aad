"""Capabilities, seccomp, user namespaces, read-only roots and escapes: each seen from inside, for real."""
import os

import pytest

from labkit.wire.errors import InvalidSpec
from labkit.wire.arch import DOCKER_DEFAULT_CAPS, syscall_numbers
from labkit.wire.specs import ProcessSpec

pytestmark = pytest.mark.privileged


def test_spec_checks_capabilities_and_syscalls():
    assert ProcessSpec(argv=["true"], cap_keep=["net_bind_service", "CAP_KILL"]).cap_keep == (
        "CAP_KILL", "CAP_NET_BIND_SERVICE")
    with pytest.raises(InvalidSpec, match="unknown capability"):
        ProcessSpec(argv=["true"], cap_keep=["SYS_GOD"])
    with pytest.raises(InvalidSpec, match="list"):
        ProcessSpec(argv=["true"], cap_keep="KILL")
    with pytest.raises(InvalidSpec, match="unknown syscall"):
        ProcessSpec(argv=["true"], seccomp_deny=["fly"])
    assert syscall_numbers(["mkdir"], "x86_64") == [83, 258] and syscall_numbers(["mkdir"], "aarch64") == [34]


def test_seccomp_makes_the_denied_syscall_fail_with_eperm(lab, rootfs_name):
    argv = ["/bin/sh", "-c", "mkdir /made-here; echo mkdir=$?; hostname; echo hostname=$?"]
    free = lab.run_in(argv, ["mnt", "uts"], rootfs=rootfs_name, root_mode="pivot_root")
    assert "mkdir=0" in free.stdout
    rec = lab.run_in(argv, ["mnt", "uts"], rootfs=rootfs_name, root_mode="pivot_root", seccomp_deny=["mkdir"])
    assert "mkdir=1" in rec.stdout and "Operation not permitted" in rec.stderr
    assert "hostname=0" in rec.stdout, "only the named syscall is refused"
    status = lab.run_in(["/bin/sh", "-c", "grep -E '^(Seccomp|NoNewPrivs)' /proc/self/status"], ["mnt", "pid"],
                        rootfs=rootfs_name, root_mode="pivot_root", seccomp_deny=["mount"]).stdout
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status


def test_dropped_capabilities_stay_dropped_even_for_root(lab, rootfs_name):
    rec = lab.run_in(["/bin/sh", "-c", "grep -E '^Cap(Eff|Bnd)' /proc/self/status; mkdir -p /m; mount -t tmpfs x /m; echo rc=$?"],
                     ["mnt", "pid"], rootfs=rootfs_name, root_mode="pivot_root", cap_keep=DOCKER_DEFAULT_CAPS)
    eff = int(rec.stdout.split("CapEff:")[1].split()[0], 16)
    from labkit.wire.arch import CAPS
    assert eff == sum(1 << CAPS.index(c) for c in DOCKER_DEFAULT_CAPS)
    assert "rc=0" not in rec.stdout and "permission denied" in rec.stderr.lower(), "no CAP_SYS_ADMIN: no mount"


def test_a_read_only_root_refuses_writes(lab, rootfs_name):
    rec = lab.run_in(["/bin/sh", "-c", "echo x > /etc/new-file; echo rc=$?"], ["mnt"], rootfs=rootfs_name,
                     root_mode="pivot_root", read_only=True)
    assert "rc=1" in rec.stdout and "Read-only file system" in rec.stderr
    assert not os.path.exists(f"/var/lib/labkit/rootfs/{rootfs_name}/etc/new-file")


def test_root_in_a_user_namespace_is_nobody_on_the_host(lab, rootfs_name):
    p = lab.spawn(["/bin/sleep", "30"], ["user", "mnt", "pid"], rootfs=rootfs_name, root_mode="pivot_root",
                  id_map=((0, 100000, 65536),))
    try:
        info = p.inspect()
        status = open(f"/proc/{info['pid']}/status").read()
        uid_line = [ln for ln in status.splitlines() if ln.startswith("Uid:")][0].split()
        assert uid_line[1] == "100000", "root inside is uid 100000 outside"
    finally:
        p.stop()


def test_escape_attempts_succeed_where_they_should_and_fail_when_hardened(lab, rootfs_name):
    from labkit.course import security
    box = ["uts", "pid", "mnt", "ipc", "net", "cgroup"]
    table, why = security.escape_attempts(lab, rootfs_name, {
        "chroot only": {},
        "root container": {"namespaces": box},
        "Docker's defaults": {"namespaces": box, "cap_keep": DOCKER_DEFAULT_CAPS, "proc_sys_ro": True,
                              "image": "busybox"},
        "hardened": {"namespaces": box + ["user"], "id_map": ((0, 100000, 65536),), "cap_keep": DOCKER_DEFAULT_CAPS,
                     "read_only": True, "seccomp_deny": ["mount", "unshare"]}})
    assert (table["hardened"] == "blocked").all(), why["hardened"].to_dict()
    assert (table["Docker's defaults"] == "blocked").all(), why["Docker's defaults"].to_dict()
    host = lab.call("probe.host_disk")
    chroot = table["chroot only"]
    if not host["host_can_read"]:  # this machine refuses raw disk reads even to root (the reason says so)
        assert "even to the host's root" in why.loc["read a host disk (mknod)", "chroot only"] or not host["dev"]
        chroot = chroot.drop("read a host disk (mknod)")
    assert (chroot == "ESCAPED").all(), why["chroot only"].to_dict()
    rc = table["root container"]
    assert rc["break out of its root (chroot ..)"] == "blocked" and rc["see the host's PID 1"] == "blocked"
    assert rc["write the host's /proc/sys"] == "ESCAPED", "root without a user namespace is the host's root"
    assert "not permitted" in why.loc["mount in the host's mount table", "hardened"]
    assert not os.listdir("/run/labkit/probe")


def test_decode_caps_and_the_dirty_cow_note():
    from labkit.course import security
    assert security.decode_caps("0000000000200000") == ["CAP_SYS_ADMIN"]
    assert sorted(security.decode_caps("00000000a80425fb")) == sorted(DOCKER_DEFAULT_CAPS)
    assert "not affected" in security.dirty_cow_note("6.1.0-56-cloud-amd64")
    assert "backported" in security.dirty_cow_note("4.4.0-21-generic")


def test_disk_and_setuid_attempts_escape_a_root_container_and_not_dockers_defaults(lab, rootfs_name):
    """The two attempts lab 08 added, for real: a container that keeps every capability leaves a set-user-ID
    file that any host user can run as root; Docker's defaults (a container root in root's own store, nodev)
    block both. The disk column's answer depends on the machine (some refuse raw disk reads even to root): the
    reason says which; tests/test_engine.py proves the nodev part with a loop device."""
    from labkit.course.security import escape_attempts
    box = ["uts", "pid", "mnt", "ipc", "net"]
    table, why = escape_attempts(lab, rootfs_name, {
        "root container": {"namespaces": box},
        "Docker's defaults": {"namespaces": box, "cap_keep": DOCKER_DEFAULT_CAPS, "proc_sys_ro": True,
                              "image": "busybox"}})
    setuid, disk = "leave a setuid file for host users", "read a host disk (mknod)"
    assert table.loc[setuid, "root container"] == "ESCAPED", why.loc[setuid, "root container"]
    assert "as the host's root" in why.loc[setuid, "root container"]
    assert table.loc[setuid, "Docker's defaults"] == "blocked"
    assert "cannot reach it" in why.loc[setuid, "Docker's defaults"], why.loc[setuid, "Docker's defaults"]
    assert table.loc[disk, "Docker's defaults"] == "blocked"
    host = lab.call("probe.host_disk")
    if host["dev"] and host["host_can_read"]:
        assert table.loc[disk, "root container"] == "ESCAPED", why.loc[disk, "root container"]
        assert "nodev" in why.loc[disk, "Docker's defaults"]
    elif host["dev"]:
        assert "even to the host's root" in why.loc[disk, "root container"]
    assert (table["Docker's defaults"] == "blocked").all(), why["Docker's defaults"].to_dict()
    assert not [n for n in os.listdir("/var/lib/labkit/containers") if n.startswith("lk08-")]
    assert not [n for n in os.listdir(f"/var/lib/labkit/rootfs/{rootfs_name}") if n.startswith(".lk-suid")]
