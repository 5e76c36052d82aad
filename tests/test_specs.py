"""Specs are pure: validation and normalisation without touching the kernel."""
import pytest

from labkit.errors import InvalidSpec
from labkit.specs import NAMESPACES, ProcessSpec, RootfsSpec, check_name, normalize_namespaces, rootfs_path


def test_namespaces_normalise_aliases_and_order():
    assert normalize_namespaces(["network", "mount", "uts"]) == ("uts", "mnt", "net")
    assert normalize_namespaces("pid,user") == ("pid", "user")
    assert normalize_namespaces("all") == NAMESPACES
    assert normalize_namespaces(None) == ()


def test_unknown_namespace_says_which_exist():
    with pytest.raises(InvalidSpec) as err:
        normalize_namespaces(["uts", "time-travel"])
    assert "time-travel" in str(err.value) and "uts, pid, mnt" in err.value.fix


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../etc", "Demo", "-x", "a" * 64, "x..y", None])
def test_bad_names_are_refused(bad):
    with pytest.raises(InvalidSpec):
        check_name(bad)


def test_rootfs_paths_stay_inside_labkit_state():
    assert rootfs_path("demo") == "/var/lib/labkit/rootfs/demo"
    assert rootfs_path("/var/lib/labkit/rootfs/demo/") == "/var/lib/labkit/rootfs/demo"
    for bad, msg in [("/", "host itself"), ("//", "host itself"), ("/etc", "outside"),
                     ("/var/lib/labkit/rootfs/../../../etc", "outside"), ("/var/lib/labkit/rootfs", "outside"),
                     ("/var/lib/labkit/rootfs/a/b", "outside")]:
        with pytest.raises(InvalidSpec, match=msg):
            rootfs_path(bad)


def test_process_spec_rules():
    s = ProcessSpec(argv=["hostname"], namespaces=["uts", "mount"], hostname="box")
    assert s.namespaces == ("uts", "mnt") and s.argv == ("hostname",)
    assert ProcessSpec.from_dict(s.to_dict()) == s
    with pytest.raises(InvalidSpec, match="rename the host"):
        ProcessSpec(argv=["true"], hostname="box")
    with pytest.raises(InvalidSpec, match="mount namespace"):
        ProcessSpec(argv=["true"], rootfs="demo", root_mode="pivot_root")
    with pytest.raises(InvalidSpec, match="list of arguments"):
        ProcessSpec(argv="ls -l")
    with pytest.raises(InvalidSpec, match="nothing to run"):
        ProcessSpec()
    with pytest.raises(InvalidSpec, match="hostname"):
        ProcessSpec(argv=["true"], namespaces=["uts"], hostname="bad host!")
    with pytest.raises(InvalidSpec, match="unknown process option"):
        ProcessSpec.from_dict({"argv": ["true"], "privileged": True})
    with pytest.raises(InvalidSpec, match="escape needs a root"):
        ProcessSpec(action="escape")


def test_default_proc_mount_follows_the_namespaces():
    assert ProcessSpec(action="probe", namespaces=["pid"]).wants_proc is True
    assert ProcessSpec(action="probe").wants_proc is False
    assert ProcessSpec(action="probe", rootfs="demo").wants_proc is True


def test_rootfs_spec():
    assert RootfsSpec("demo").path == "/var/lib/labkit/rootfs/demo"
    with pytest.raises(InvalidSpec, match="built-in image"):
        RootfsSpec("demo", image="ubuntu")
