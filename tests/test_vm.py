"""The VM baseline boots for real (TCG here) and runs the same busybox as the containers."""
import platform
import subprocess

import pytest

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


def ours_running():
    """qemu processes of the baseline VM (the VM tier's own guest may run meanwhile, and is not ours)."""
    return subprocess.run(["pgrep", "-f", "labkit.cmd="], capture_output=True, text=True).stdout.strip()


def test_a_vm_boots_its_own_kernel_and_runs_a_command(lab):
    rec = lab.vm("echo hello from the VM; uname -r; id -u", accel="tcg", timeout=240)
    out = rec["stdout"].split()
    assert out[:4] == ["hello", "from", "the", "VM"] and out[-1] == "0"
    facts = rec["facts"]
    assert facts["accel"] == "tcg" and facts["accel_reason"] == "asked for"
    assert facts["kernel"] == out[4] and facts["kernel"] != platform.release(), "a VM runs a kernel of its own"
    assert facts["boot_to_ready_s"] and facts["boot_to_ready_s"] < facts["total_s"]
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
