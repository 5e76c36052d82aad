"""chroot vs pivot_root, checked from the host's side."""
import os

import pytest

from labkit.agent.chroot import ESCAPE_DIR

pytestmark = pytest.mark.privileged


def test_chroot_root_is_the_rootfs_seen_from_the_host(lab, rootfs_name):
    path = f"/var/lib/labkit/rootfs/{rootfs_name}"
    with lab.spawn(rootfs=rootfs_name) as p:
        assert os.readlink(f"/proc/{p.pid}/root") == path
        assert p.inspect()["shares_with_host"]["mnt"] is True
    with lab.spawn(namespaces=["mnt"], rootfs=rootfs_name, root_mode="pivot_root") as p:
        # after pivot_root the process's root is the root of its own mount namespace
        assert p.inspect()["shares_with_host"]["mnt"] is False
        assert "labkit busybox" in p.exec(["cat", "/etc/os-release"]).stdout
        assert p.exec(["ls", "/var/lib"]).exit_code != 0, "the host's /var/lib must not be reachable"


def test_escape_leaves_the_rootfs_as_it_was(lab, rootfs_name):
    rec = lab.escape(rootfs_name)
    assert rec.facts["view"]["escaped"] is True
    assert "etc" in rec.facts["view"]["root_listing"] and ".labkit-rootfs" not in rec.facts["view"]["root_listing"]
    assert not os.path.exists(f"/var/lib/labkit/rootfs/{rootfs_name}/{ESCAPE_DIR}")


def test_escape_from_pivot_root_stays_inside(lab, rootfs_name):
    rec = lab.escape(rootfs_name, pivot_root=True)
    view = rec.facts["view"]
    assert view["escaped"] is False and ".labkit-rootfs" in view["root_listing"]
    calls = [s.get("call") for s in rec.steps]
    assert calls.index("pivot_root") < calls.index("umount2") < len(calls) - calls[::-1].index("chroot")
