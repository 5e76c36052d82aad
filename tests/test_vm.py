"""The VM baseline boots for real (TCG here) and runs the same busybox as the containers."""
import os
import platform
import shutil
import socket
import subprocess
import sys
import time

import pytest

from labkit.wire.errors import InvalidSpec, LabkitError
from labkit.wire.specs import NetworkSpec

from conftest import REPO

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


def ours_running():
    """qemu processes of labkit's VMs (the VM tier's own guest may run meanwhile, and is not ours)."""
    return subprocess.run(["pgrep", "-f", "labkit-vm-"], capture_output=True, text=True).stdout.strip()


def test_a_vm_boots_its_own_kernel_and_runs_a_command(lab):
    rec = lab.vm("echo hello from the VM; uname -r; id -u", accel="tcg", timeout=240)
    out = rec["stdout"].split()
    assert out[:4] == ["hello", "from", "the", "VM"] and out[-1] == "0"
    facts = rec["facts"]
    assert facts["accel"] == "tcg" and facts["accel_reason"] == "asked for"
    assert facts["kernel"] == out[4] and facts["kernel"] == os.path.basename(facts["kernel_image"])[len("vmlinuz-"):]
    assert facts["boot_to_ready_s"] and facts["boot_to_ready_s"] < facts["boot_to_up_s"] < facts["total_s"]
    assert facts["qemu_peak_rss_kb"] > 10_000 and facts["guest_mem_total_kb"] > 100_000
    assert rec["exit_code"] == 0
    assert not ours_running(), "no baseline qemu left running"


def test_a_failing_guest_command_reports_its_status(lab):
    rec = lab.vm("exit 3", accel="tcg", timeout=240)
    assert rec["exit_code"] == 3


def test_the_default_accel_is_probed_and_labelled(lab):
    rec = lab.vm("true", timeout=240)
    facts = rec["facts"]
    assert facts["accel"] in ("kvm", "tcg") and facts["accel_reason"]
    if facts["accel"] == "tcg":
        assert "TCG" in facts["accel_reason"] or "not usable" in facts["accel_reason"] or "/dev/kvm" in facts["accel_reason"]
    assert not ours_running()


def test_a_long_lived_vm_with_disk_and_network(lab):
    """One boot, many commands; a virtio disk at /mnt; a virtio NIC on a tap on a labkit bridge that the
    host reaches; stop() removes qemu, tap, disk and the state entry."""
    net = lab.network("vmtest", "10.213.91.0/24")
    try:
        with lab.vm_start(accel="tcg", network="vmtest", disk_mb=64) as vm:
            assert vm.accel == "tcg" and vm.ip.startswith("10.213.91.")
            assert vm.exec("echo one")["stdout"] == "one\n"
            assert vm.exec("exit 7")["exit_code"] == 7
            mounts = vm.exec("grep ' /mnt ' /proc/mounts")["stdout"]
            assert "/dev/vda /mnt ext4" in mounts
            assert vm.exec("dd if=/dev/zero of=/mnt/f bs=1M count=4 conv=fsync 2>/dev/null && ls -l /mnt/f")["exit_code"] == 0
            addr = vm.exec("ip -4 addr show eth0")["stdout"]
            assert vm.ip in addr
            vm.exec("nc -l -p 7000 -e /bin/busybox cat </dev/null >/dev/null 2>&1 &")
            for _ in range(200):
                try:
                    s = socket.create_connection((vm.ip, 7000), timeout=5)
                    break
                except OSError:
                    time.sleep(0.05)
            with s:
                s.sendall(b"ping over virtio\n")
                assert s.recv(100) == b"ping over virtio\n"
            fp = vm.footprint()
            assert fp["qemu_pss_kb"] > 10_000 and 100_000 < fp["guest_mem_total_kb"] < 256 * 1024
            state = [v for v in lab.call("vm.list") if v["id"] == vm.id][0]
            tap, disk = state["tap"], state["disk"]
            assert os.path.exists(f"/sys/class/net/{tap}") and os.path.exists(disk)
            assert ours_running()
        assert not os.path.exists(f"/sys/class/net/{tap}") and not os.path.exists(disk)
        assert not [v for v in lab.call("vm.list") if v["id"] == vm.id]
        assert not ours_running()
    finally:
        net.remove()


def test_cleanup_kills_a_vm_whose_owner_died(lab):
    """An agent that dies without stopping its VM leaves a recorded state entry: cleanup kills that qemu."""
    code = ("import os; from labkit.agent import vm; v = vm.VM(accel_mode='tcg'); v.start(); "
            "print(v.id, v.proc.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=REPO)
    vm_id, pid = out.stdout.split()
    assert os.path.exists(f"/proc/{pid}"), "qemu outlived its owner"
    plan = lab.cleanup(dry_run=True)
    assert f"vm {vm_id}" in plan.facts["found"]
    rec = lab.cleanup()
    assert f"vm {vm_id}" in rec["removed"]
    assert not ours_running()


def test_bad_vm_requests_say_what_to_do(lab):
    with pytest.raises(InvalidSpec, match="memory_mb"):
        lab.vm_start(memory_mb=8)
    with pytest.raises(InvalidSpec, match="accel"):
        lab.vm_start(accel="hvf")
    with pytest.raises(LabkitError, match="no VM"):
        lab.call("vm.exec", vm_id="deadbeef", command="true")
    with lab.vm_start(accel="tcg") as vm:
        with pytest.raises(InvalidSpec, match="too long"):
            vm.exec("echo " + "x" * 4000)
        assert vm.exec("echo still fine")["stdout"] == "still fine\n"
    assert not ours_running()


def test_the_initramfs_carries_the_virtio_modules_in_load_order():
    from labkit.agent import initramfs, vm
    kernel = vm.find_kernel()
    files, notes = initramfs._module_files(initramfs._kernel_release(kernel))
    names = [n for n, _ in files]
    if not os.path.isdir(f"/lib/modules/{initramfs._kernel_release(kernel)}"):
        pytest.skip("no modules for the /boot kernel")
    for mod in ("virtio_net.ko", "virtio_blk.ko"):
        if mod in names:
            assert names.index("virtio_ring.ko") < names.index(mod) and names.index("virtio.ko") < names.index(mod)
    assert all(data[:4] == b"\x7fELF" for _, data in files), "modules are plain ELF for busybox insmod"
    assert platform.machine() in vm.QEMU


def foreign_guest():
    """(machine, kernel, busybox, modules root) of the other architecture (scripts/fetch-foreign-guest.sh), as
    the agent finds it (:func:`labkit.agent.vm.foreign_guest`)."""
    from labkit.agent import vm as V
    g = V.foreign_guest()
    if g.get("missing"):
        if os.environ.get("CI") == "true":
            raise AssertionError("scripts/setup.sh --dev should have fetched the foreign guest: " + g["missing"])
        pytest.skip(f"no foreign guest: {g['fix']}")
    return g["machine"], g["kernel"], g["busybox"], g["root"]


def test_the_other_architecture_boots_too_with_disk_and_network(lab):
    """x86_64 and aarch64 both: the other one's distro kernel and busybox boot here under TCG
    (qemu-system-aarch64 -M virt on this x86_64 machine), with the same probe and workloads."""
    from labkit.agent import network, vm as V
    machine, kernel, busybox, root = foreign_guest()
    with pytest.raises(InvalidSpec, match="emulated"):
        V.VM(accel_mode="kvm", machine=machine, kernel=kernel, busybox=busybox)
    network.create(NetworkSpec(name="vmarch", subnet="10.213.93.0/24"))
    guest = V.VM(accel_mode="tcg", machine=machine, kernel=kernel, busybox=busybox, modules_root=root, disk_mb=64,
                 network_name="vmarch", boot_timeout=240)
    try:
        guest.start()
        assert guest.rec.facts["machine"] == machine
        out = guest.exec("uname -m; grep ' /mnt ' /proc/mounts; ip -4 addr show eth0", timeout=120)["stdout"]
        assert out.split()[0] == machine and "/dev/vda /mnt ext4" in out and guest.net["ip"] in out
        sample = guest.exec("sh /lk/bench.sh cpu 20000 /mnt", timeout=120)["stdout"]
        assert "LKB cpu" in sample
    finally:
        guest.stop()
        network.remove("vmarch")
    assert not ours_running()


@pytest.mark.skipif(not shutil.which("zstd"), reason="zstd is not installed")
def test_a_zstd_module_unpacks_through_the_runner(tmp_path):
    """Ubuntu's kernels ship .ko.zst modules: the initramfs unpacks them with the zstd tool, via the runner."""
    from labkit.agent import initramfs
    data = os.urandom(50000) + b"\x7fELF" * 100
    (tmp_path / "m.ko").write_bytes(data)
    subprocess.run(["zstd", "-q", str(tmp_path / "m.ko"), "-o", str(tmp_path / "m.ko.zst")], check=True)
    assert initramfs._read_module(str(tmp_path / "m.ko.zst")) == data
