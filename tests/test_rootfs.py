"""The built-in busybox rootfs and the runtime's /proc, /sys and /dev inside a container."""
import os

import pytest

from labkit.agent import rootfs
from labkit.wire.errors import InvalidSpec, MechanismError, NotFound

pytestmark = pytest.mark.privileged


def test_busybox_is_static_and_found():
    bb = rootfs.find_static_busybox()
    assert bb and rootfs.is_static_elf(bb)
    assert not rootfs.is_static_elf("/usr/bin/python3.11" if os.path.exists("/usr/bin/python3.11") else "/bin/ls")
    assert not rootfs.is_static_elf("/etc/passwd")


def test_built_rootfs_is_a_small_system(lab, rootfs_name):
    info = lab.call("rootfs.info", name=rootfs_name)
    path = info["path"]
    assert os.readlink(f"{path}/bin/sh") == "/bin/busybox"
    assert os.stat(f"{path}/tmp").st_mode & 0o1777 == 0o1777
    assert "root:x:0:0" in open(f"{path}/etc/passwd").read()
    assert info["facts"]["files"] > 100
    # reuse without replace keeps it as it was
    again = lab.rootfs(rootfs_name)
    assert again.created is False and again.record.facts["existed"] is True


def test_runtime_mounts_inside_a_container(lab, rootfs_name):
    rec = lab.run_in(["sh", "-c", "ls /dev; grep -E ' /(proc|sys|dev|dev/pts|dev/shm) ' /proc/self/mountinfo"],
                     ["mnt", "pid", "net"], rootfs=rootfs_name, root_mode="pivot_root")
    out = rec.stdout
    for dev in ("null", "zero", "urandom", "tty", "pts", "shm", "ptmx", "stdout"):
        assert dev in out.split(), dev
    assert " /proc " in out and " /sys " in out and " /dev " in out
    sys_line = [line for line in out.splitlines() if " /sys " in line][0]
    assert " ro," in sys_line or " ro " in sys_line, "sysfs must be read-only inside"
    # nothing of that is mounted on the host
    assert rootfs.mounts_under(f"/var/lib/labkit/rootfs/{rootfs_name}") == []


def test_chroot_without_mount_namespace_undoes_its_proc_mount(lab, rootfs_name):
    rec = lab.chroot(rootfs_name, ["sh", "-c", "ls /proc | grep -c '^[0-9]'"])
    assert int(rec.stdout.strip()) > 5, "chroot alone shows the host's processes"
    mounts = [s for s in rec.steps if s.get("call") in ("mount", "umount2")]
    assert [s["call"] for s in mounts] == ["mount", "umount2"]
    assert rootfs.mounts_under(f"/var/lib/labkit/rootfs/{rootfs_name}") == []


def test_remove_refuses_a_busy_rootfs_and_foreign_dirs(lab, rootfs_name):
    p = lab.spawn(rootfs=rootfs_name)  # chroot + a /proc mount on the host
    try:
        with pytest.raises(MechanismError, match="still has mounts"):
            lab.call("rootfs.remove", name=rootfs_name)
    finally:
        p.stop()
    os.makedirs("/var/lib/labkit/rootfs/not-ours", exist_ok=True)
    try:
        with pytest.raises(InvalidSpec, match="not made by labkit"):
            lab.call("rootfs.remove", name="not-ours")
        with pytest.raises(NotFound, match="make it first"):
            lab.call("rootfs.info", name="not-ours")
    finally:
        os.rmdir("/var/lib/labkit/rootfs/not-ours")
