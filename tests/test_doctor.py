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
