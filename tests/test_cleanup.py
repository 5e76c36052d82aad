"""`labkit cleanup` removes every kind of labkit kernel object, is idempotent, and touches nothing else."""
import os
import subprocess

import pytest

from labkit.agent import cgroups

pytestmark = pytest.mark.privileged


def sh(*argv):
    subprocess.run(argv, check=True, capture_output=True)


def test_cleanup_removes_only_labkit_objects(lab):
    # labkit's objects, made by hand the way a crashed run could leave them
    os.makedirs("/run/labkit/t-mnt", exist_ok=True)
    sh("mount", "-t", "tmpfs", "lk-test", "/run/labkit/t-mnt")
    sh("ip", "netns", "add", "lk-t-cleanup")
    sh("ip", "link", "add", "lkv0badc0de", "type", "veth", "peer", "name", "lkp0badc0de")
    groups = []
    for mp, fstype, ctrls in cgroups.hierarchies():
        if fstype == "cgroup2" or "pids" in ctrls:
            g = os.path.join(mp, "labkit", "t-cleanup")
            os.makedirs(g, exist_ok=True)
            groups.append(g)
    proc = lab.spawn(namespaces=["uts", "pid", "mnt"], name="t-cleanup")
    # and somebody else's, with names close to labkit's
    sh("ip", "netns", "add", "notlk-t-cleanup")
    sh("ip", "link", "add", "xlkt0", "type", "veth", "peer", "name", "xlkt1")
    sh("ip", "link", "add", "lkfoo0", "type", "veth", "peer", "name", "lkvnothex")  # "lk", but no family of ours
    try:
        plan = {f"{k} {n}" for k, n in lab.call("cleanup.plan")}
        assert "mount /run/labkit/t-mnt" in plan and "netns lk-t-cleanup" in plan and "link lkv0badc0de" in plan
        assert "process t-cleanup" in plan and all(f"cgroup {g}" in plan for g in groups)
        rec = lab.cleanup()
        assert rec.facts["left"] == []
        assert not any(os.path.exists(g) for g in groups)
        assert not os.path.exists("/run/netns/lk-t-cleanup")
        assert lab.processes() == []
        assert not os.path.ismount("/run/labkit/t-mnt")
        # idempotent
        assert lab.cleanup()["removed"] == []
        # the neighbours are untouched
        assert os.path.exists("/run/netns/notlk-t-cleanup")
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert "xlkt0" in links and "lkfoo0" in links and "lkvnothex" in links
        assert not lab.read_file(f"/proc/{proc.pid}/cmdline")["text"]
    finally:
        subprocess.run(["ip", "netns", "delete", "notlk-t-cleanup"], capture_output=True)
        subprocess.run(["ip", "link", "delete", "xlkt0"], capture_output=True)
        subprocess.run(["ip", "link", "delete", "lkfoo0"], capture_output=True)
        lab.cleanup()
        if os.path.isdir("/run/labkit/t-mnt"):
            os.rmdir("/run/labkit/t-mnt")


def test_dry_run_changes_nothing(lab):
    sh("ip", "netns", "add", "lk-t-dry")
    try:
        rec = lab.cleanup(dry_run=True)
        assert "netns lk-t-dry" in rec.facts["found"]
        assert os.path.exists("/run/netns/lk-t-dry")
    finally:
        sh("ip", "netns", "delete", "lk-t-dry")


def test_a_filesystem_mounted_at_labkits_own_directory_is_not_cleanup_s(tmp_path):
    """A host may give labkit a disk of its own at /var/lib/labkit or /run/labkit: cleanup removes mounts
    below them, never the mount itself (tried in a private mount namespace, so the host is untouched)."""
    import sys
    from conftest import REPO
    script = ("mount -t tmpfs lk-own-disk /run/labkit && mkdir -p /run/labkit/t-below && "
              "mount -t tmpfs lk-below /run/labkit/t-below && exec \"$@\"")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                          sys.executable, "-m", "labkit", "cleanup", "--target", "local"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "removed mount /run/labkit/t-below" in out.stdout
    assert "mount /run/labkit\n" not in out.stdout + "\n" and "could not remove" not in out.stderr
