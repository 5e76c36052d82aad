"""The doctor probes for real and reports each missing piece with its fix."""
import pytest

from labkit.agent import cgroups, doctor

pytestmark = pytest.mark.privileged


def test_cgroup_mode_matches_the_mounts():
    d = cgroups.detect()
    fstypes = {fs for _, fs, _ in cgroups.hierarchies()}
    if fstypes == {"cgroup2"}:
        assert d["mode"] == "v2"
    elif fstypes == {"cgroup", "cgroup2"}:
        assert d["mode"] == "hybrid" and d["v1"]
    elif fstypes == {"cgroup"}:
        assert d["mode"] == "v1"


def test_kvm_probe_gives_a_reason_either_way():
    r = doctor.probe_kvm(timeout=10)
    assert r["usable"] in (True, False, None) and r["reason"]


def test_missing_things_carry_a_fix():
    rep = doctor.doctor()
    for line in rep["lines"]:
        assert line["status"] in ("ok", "warn", "missing")
        if line["status"] == "missing":
            assert line["fix"], line


def test_link_probe_leaves_no_namespace_behind():
    import os
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert doctor.check_links()["status"] == "ok"
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert after == before


def test_the_vm_kernel_line_names_the_image_the_vm_boots():
    import os
    from labkit.agent import vm
    line = next(ln for ln in doctor.doctor()["lines"] if ln["check"] == "vm kernel")
    assert line["status"] == "ok" and line["value"] == os.path.basename(vm.find_kernel())
    if not os.path.exists(f"/boot/vmlinuz-{os.uname().release}"):
        assert "not in /boot" in line["detail"], "the doctor says the VM boots another kernel than the running one"


def test_the_kvm_line_tells_when_only_a_boot_sector_runs():
    """Nested KVM can run a boot sector and hang a kernel: the doctor repeats the VM baseline's verdict."""
    import json
    import os
    path = doctor.VM_PROBE_CACHE
    before = open(path).read() if os.path.exists(path) else None
    boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"boot_id": boot_id, "mode": "tcg", "reason": "a KVM guest did not boot (test)"}, f)
        line = doctor.check_kvm()
        if doctor.probe_kvm()["usable"]:
            assert line["status"] == "warn" and "TCG" in line["value"] and "(test)" in line["detail"]
        else:
            assert line["status"] != "ok"
    finally:
        if before is None:
            os.unlink(path)
        else:
            with open(path, "w") as f:
                f.write(before)
