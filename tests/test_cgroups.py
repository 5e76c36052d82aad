"""cgroup mode detection over the three host realities (pure v2, hybrid, pure v1).

The live machine is hybrid; the pure-v2 and pure-v1 cases use mountinfo lines as those hosts print them
(a Debian 12 guest, an old CentOS 7 host), since neither hierarchy can be mounted beside this one.
The real v2 guest tier arrives with the lab-VM issue."""
from labkit.agent import cgroups

V2 = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
HYBRID = (
    "30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755\n"
    "31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate\n"
    "32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd\n"
    "35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory\n"
    "36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct\n")
V1 = (
    "25 18 0:22 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,xattr,release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd\n"
    "27 18 0:24 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,pids\n")


def fake_read(path):
    return {"/sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n",
            "/sys/fs/cgroup/unified/cgroup.controllers": ""}.get(path)


def test_pure_v2():
    d = cgroups.detect(V2, fake_read)
    assert d["mode"] == "v2" and d["v2_mount"] == "/sys/fs/cgroup" and "memory" in d["v2_controllers"]


def test_hybrid():
    d = cgroups.detect(HYBRID, fake_read)
    assert d["mode"] == "hybrid" and d["v2_controllers"] == []
    assert d["v1"]["memory"] == "/sys/fs/cgroup/memory" and d["v1"]["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"


def test_pure_v1_ignores_named_hierarchies():
    d = cgroups.detect(V1, fake_read)
    assert d["mode"] == "v1" and "pids" in d["v1"] and d["v2_mount"] is None


def test_no_cgroups():
    assert cgroups.detect("", fake_read)["mode"] == "none"


def test_this_machine():
    assert cgroups.detect()["mode"] in ("v1", "v2", "hybrid")
