"""The isolation matrix agrees with what each configuration really isolates, from a plain process to a VM."""
import os

import pytest

from labkit.course import isolation

pytestmark = pytest.mark.privileged


def test_matrix_rows(lab, rootfs_name, tmp_path):
    res = isolation.isolation_matrix(lab, rootfs=rootfs_name)
    m = res.matrix
    assert list(m.columns) == list(isolation.BASIC)
    assert m.loc["plain process"].tolist() == [1] * 8
    assert m.loc["container"].tolist() == [0, 0, 0, 0, 1, 0, 0, 0], "without a user namespace root is the host's root"
    assert m.loc["container + userns, default caps"].tolist() == [0] * 8
    assert m.loc["net", "links"] == 0 and m.loc["net"].sum() == 7
    # the IPC namespace hides the System V segment the host made; the cgroup namespace, the host's cgroup paths
    assert m.loc["ipc", "IPC objects"] == 0 and m.loc["ipc"].sum() == 7
    assert m.loc["cgroup", "cgroup path"] == 0 and m.loc["cgroup"].sum() == 7
    assert "lists the segment the host just made" in res.reasons.loc["pid + mnt (own /proc)", "IPC objects"]
    assert "own cgroup namespace" in res.reasons.loc["cgroup", "cgroup path"]
    assert not os.listdir("/run/labkit/probe") and f"{res.host['shm_key']} " not in open("/proc/sysvipc/shm").read(), \
        "the marker and the host's segment are gone"
    assert m.loc["uts", "hostname"] == 0 and m.loc["user", "users"] == 0
    assert m.loc["pid (host /proc)", "host PIDs"] == 1 and m.loc["pid + mnt (own /proc)", "host PIDs"] == 0
    assert m.loc["chroot", "files"] == 0 and m.loc["chroot", "host PIDs"] == 1
    assert m.loc["chroot", "mounts"] == 1, "chroot shares the host's mount namespace"
    assert "hostname 'lk-uts'" == res.reasons.loc["uts", "hostname"]
    from labkit.course import plotting
    path = plotting.save(res.chart(), str(tmp_path), "m")
    assert path.endswith("m.png")


@pytest.mark.slow
def test_every_column_and_the_vm_checked_against_the_truth(lab, rootfs_name):
    res = isolation.isolation_matrix(lab, rootfs=rootfs_name, columns=isolation.ALL, vm=True, accel="tcg")
    m, f = res.matrix, res.facts
    vm_row = "VM (TCG)"
    host_pid_ns = os.stat("/proc/self/ns/pid").st_ino
    # the facts themselves, against the kernel's truth
    assert int(f["container"]["ns_pid"]) != host_pid_ns and int(f["net"]["ns_pid"]) == host_pid_ns
    assert f["container"]["boot_id"] == open("/proc/sys/kernel/random/boot_id").read().strip()
    assert f[vm_row]["boot_id"] != f["container"]["boot_id"], "a VM boots a kernel of its own"
    assert f["container + userns, default caps"]["uid_map"].startswith("0 100000 65536")
    caps = int(f["container + userns, default caps"]["capeff"], 16)
    assert caps >> 21 & 1 == 0 and caps >> 25 & 1 == 0, "no CAP_SYS_ADMIN, no CAP_SYS_TIME"
    # the lecture's point: every container shares the host's kernel; only the VM has its own
    assert m["kernel"].drop(vm_row).eq(1).all() and m.loc[vm_row, "kernel"] == 0
    assert m.loc[vm_row].sum() == 0
    assert m.loc["plain process"].sum() == len(isolation.ALL)
    # what a root container without a user namespace can still do to the host
    assert m.loc["container", "set clock"] == 1 and m.loc["container", "mount (host)"] == 0
    assert m.loc["container + userns, default caps", "set clock"] == 0
    assert m.loc["container", "memory"] == 0 and "268435456" in res.reasons.loc["container", "memory"]
    assert m.loc["chroot", "mount (host)"] == 1, "root in a chroot can still mount on the host"
    assert "bounded by the VM's RAM" in res.reasons.loc[vm_row, "memory"]
    assert not os.listdir("/run/labkit/probe"), "the marker file is gone"
    # every namespace inode the probe read, against the configuration that made it
    host_ns = {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in ("mnt", "net", "pid", "user", "uts", "cgroup", "ipc")}
    for label, opts in isolation.default_configs(rootfs_name):
        made = set(opts.get("namespaces", ()))
        for n, ino in host_ns.items():
            assert (int(f[label][f"ns_{n}"]) == ino) == (n not in made), (label, n)
    assert f["uts"]["hostname"] == "lk-uts" and f["container"]["hostname"] == "box"
    from labkit.agent.vm import find_kernel
    assert f[vm_row]["kernel"] == os.path.basename(find_kernel())[len("vmlinuz-"):], "the VM runs the /boot image"
    assert int(f[vm_row]["mem_total_kb"]) < 256 * 1024 < int(f["container"]["mem_total_kb"]), \
        "the VM sees its own RAM; a container sees the host's"
