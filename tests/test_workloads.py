"""The probe and the workload scripts: parsed and interpreted right (pure), and real on the host."""
import os
import subprocess

import pytest

from labkit.agent import rootfs, workloads as W
from labkit.course import isolation as iso


def host(**kw):
    h = {"kernel": "6.1.0", "hostname": "host", "boot_id": "b" * 36, "pid1_start": "22", "mount_ids": ["21", "22"],
         "links": ["eth0", "lo"], "marker": "tok", "shm_key": 12345, "cgroup_self": "0::/user.slice",
         "ns": {n: 4026531840 + i for i, n in enumerate(("mnt", "net", "pid", "user", "uts", "cgroup", "ipc"))}}
    h.update(kw)
    return h


def test_parse_bench_and_probe():
    assert W.parse_bench("noise\nLKB cpu 250000 1000 loops\n") == [
        {"workload": "cpu", "elapsed_s": 0.25, "amount": 1000, "unit": "loops"}]
    assert W.parse_bench("LKB cpu x 1 loops") == []
    assert iso.parse_probe("kernel=6.1\r\nbad line\nuid_map=0 0 1;\n") == {"kernel": "6.1", "uid_map": "0 0 1;"}


def test_compare_a_vm_shares_nothing_even_with_the_same_kernel_release():
    h = host()
    guest = {"kernel": "6.1.0", "boot_id": "c" * 36, "proc": "1", "pid1_start": "22", "ns_mnt": str(h["ns"]["mnt"]),
             "ns_user": str(h["ns"]["user"]), "uid": "0", "hostname": "labkit-vm", "can_mount": "1",
             "can_load_module": "1", "can_set_clock": "1", "can_write_proc_sys": "1", "can_write_sys": "1", "mem_total_kb": "200000"}
    c = iso.compare(guest, h, vm=True)
    assert all(v == 0 for v, _ in c.values()), c
    assert "own" in c["kernel"][1] and "own kernel" in c["load module"][1]


def test_compare_a_plain_process_shares_everything():
    h = host()
    facts = {"kernel": "6.1.0", "boot_id": h["boot_id"], "proc": "1", "pid1_start": "22", "pids": "70",
             "uid": "0", "hostname": "host", "marker": "tok", "mount_ids": "21 22", "links": "eth0 lo",
             "can_mount": "1", "can_load_module": "1", "can_set_clock": "1", "can_write_proc_sys": "1", "can_write_sys": "1",
             "sees_shm": "1", "cgroup_self": "1:cpu:/;0::/user.slice",
             **{f"ns_{n}": str(i) for n, i in h["ns"].items()}}
    c = iso.compare(facts, h)
    assert all(v == 1 for v, _ in c.values()), c
    assert "0::/user.slice" in c["cgroup path"][1] and "12345" in c["IPC objects"][1]
    own = iso.compare(dict(facts, sees_shm="0", cgroup_self="0::/", ns_cgroup="1", ns_ipc="2"), h)
    assert own["IPC objects"][0] == 0 and own["cgroup path"][0] == 0 and "own cgroup namespace" in own["cgroup path"][1]
    c = iso.compare(dict(facts, can_load_module="nosys", capeff="0000000000010000"), h)
    assert c["load module"][0] == 1 and "ENOSYS" in c["load module"][1]
    c = iso.compare(facts, h, limits={"memory": 1 << 28, "pids": 64})
    assert c["memory"][0] == 0 and c["PIDs"][0] == 0


@pytest.mark.privileged
def test_the_probe_on_the_host_sees_the_host():
    ctx = W.probe_context()
    try:
        assert f"{ctx['shm_key']} " in open("/proc/sysvipc/shm").read(), "the host's segment for the IPC column"
        out = subprocess.run([ctx["busybox"], "sh", "-c", W.PROBE_SH, "probe", ctx["marker"], str(ctx["shm_key"])],
                             capture_output=True, text=True, timeout=60).stdout
        facts = iso.parse_probe(out)
        assert facts["boot_id"] == ctx["host"]["boot_id"] and facts["kernel"] == os.uname().release
        assert int(facts["ns_mnt"]) == os.stat("/proc/self/ns/mnt").st_ino
        assert facts["marker"] == ctx["host"]["marker"]
        cmp = iso.compare(facts, ctx["host"])
        assert {k: v for k, (v, _) in cmp.items() if v != 1} == {}, "a plain root process reaches everything"
    finally:
        W.probe_done(ctx["marker"])
    assert not os.path.exists(ctx["marker"])
    assert not any(ln.split()[0] == str(ctx["shm_key"]) for ln in open("/proc/sysvipc/shm").read().splitlines()[1:])


@pytest.mark.privileged
@pytest.mark.parametrize("workload,amount,unit", [("cpu", 20000, "loops"), ("memory", 32, "MiB"),
                                                  ("syscalls", 1000, "syscalls"), ("fork", 5, "processes"),
                                                  ("fileio", 2, "MiB")])
def test_every_workload_times_itself(workload, amount, unit, tmp_path):
    out = subprocess.run([rootfs.busybox_or_fail(), "sh", "-c", W.BENCH_SH, "bench", workload, str(amount),
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    [s] = W.parse_bench(out.stdout)
    assert s["unit"] == unit and s["elapsed_s"] > 0
    assert s["amount"] == (amount * 2 if workload == "syscalls" else amount)
    assert os.listdir(tmp_path) == [], "the file I/O workload removes its file"


@pytest.mark.privileged
def test_cleanup_removes_a_probe_left_behind_with_its_segment(lab):
    """A notebook killed between probe.context and probe.done leaves a marker and a System V segment: cleanup
    finds both by the marker's name, and only those (a segment of someone else's key is left)."""
    from labkit.agent import cleanup, kernel
    ctx = W.probe_context()
    other = W.shm_key("ffffffe000000000") ^ 2  # another key: not a probe's
    other_id = kernel.shm_create(other)
    try:
        assert ("probe marker", ctx["marker"]) in cleanup.plan()
        done = lab.cleanup()
        assert f"probe marker {ctx['marker']}" in done["removed"] and not os.path.exists(ctx["marker"])
        keys = [ln.split()[0] for ln in open("/proc/sysvipc/shm").read().splitlines()[1:]]
        assert str(ctx["shm_key"]) not in keys and str(other) in keys
    finally:
        kernel.shm_remove(other_id)
