"""cgroup mode detection over the three host realities (pure v2, hybrid, pure v1).

The live machine is hybrid; the pure-v2 and pure-v1 cases use mountinfo lines as those hosts print them
(a Debian 12 guest, an old CentOS 7 host), since neither hierarchy can be mounted beside this one.
The real v2 guest tier arrives with the lab-VM issue."""
import os

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


# --- limits biting, on this hybrid host and inside the pure cgroup v2 guest ----------------------

import pytest  # noqa: E402

HOG = ["sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived"]


@pytest.fixture(params=["local", "vagrant"], scope="module")
def cg_lab(request):
    """Every cgroup test runs here (hybrid) and in the lab VM (pure v2); a skipped VM tier says so."""
    if request.param == "local":
        if os.geteuid() != 0:
            pytest.skip("needs root")
        lab = request.getfixturevalue("lab")
    else:
        lab = request.getfixturevalue("vm_lab")
    return lab


@pytest.mark.privileged
def test_limits_are_written_in_the_hosts_own_files(cg_lab):
    mode = cg_lab.cgroup_mode()["mode"]
    with cg_lab.cgroup("t-limits", memory="48M", cpus=0.5, cpu_weight=50, pids=20, cpuset="0") as cg:
        written = {os.path.basename(s["path"]): s["detail"] for s in cg.record.steps if s["op"] == "write"}
        if mode == "v2":
            assert written["memory.max"] == repr(str(48 << 20)) and written["cpu.max"] == "'50000 100000'"
            assert written["cpu.weight"] == "'50'" and written["pids.max"] == "'20'"
            parent = cg_lab.cgroup_mode()["v2_mount"] + "/labkit"
            assert cg_lab.read_file(parent + "/cgroup.procs")["text"].strip() == "", "no internal processes"
            assert {"memory", "cpu", "pids"} <= set(cg_lab.read_file(parent + "/cgroup.subtree_control")["text"].split())
        else:
            assert written["memory.limit_in_bytes"] == repr(str(48 << 20))
            assert written["cpu.cfs_quota_us"] == "'50000'" and written["cpu.shares"] == "'512'"
            assert written["pids.max"] == "'20'"
        s = cg.stats()
        assert s["memory_max"] == 48 << 20 and s["pids_max"] == 20 and s["cpu_quota"] == 0.5


@pytest.mark.privileged
def test_memory_hog_is_oom_killed_at_the_limit(cg_lab):
    with cg_lab.cgroup("t-hog", memory="32M") as cg:
        rec = cg.run(HOG, ["pid", "mnt"])
        s = cg.stats()
        assert rec.exit_code == 137 and "survived" not in rec.stdout
        assert s["oom_kills"] >= 1, s  # the OOM killer may pick more than one process of the group
        assert s["memory_peak"] is None or s["memory_peak"] <= 32 << 20
    with cg_lab.cgroup("t-roomy", memory="256M") as cg:
        assert cg.run(HOG).stdout.strip() == "survived" and cg.stats()["oom_kills"] == 0


@pytest.mark.privileged
def test_busy_loop_is_throttled_to_its_quota(cg_lab):
    with cg_lab.cgroup("t-busy", cpus=0.2) as cg:
        with cg.spawn(["sh", "-c", "while :; do :; done"], ["pid", "mnt"]):
            df = cg.sample(1.5, 0.25)
        used = (df.cpu_usage_us.iloc[-1] - df.cpu_usage_us.iloc[0]) / 1e6 / (df.t.iloc[-1] - df.t.iloc[0])
        assert df.nr_throttled.iloc[-1] > 0
        assert used <= 0.2 * 1.5, f"the quota is 0.2 CPU, the loop used {used:.2f}"


@pytest.mark.privileged
def test_fork_bomb_stops_at_pids_max(cg_lab):
    bomb = ["sh", "-c", "f(){ while :; do f & sleep 0.1; done; }; f"]
    if cg_lab.run(["sh", "-c", "command -v bash"]).exit_code == 0:
        bomb[0] = "bash"  # bash retries a refused fork instead of exiting, so the bomb keeps pressing
    with cg_lab.cgroup("t-bomb", pids=24) as cg:
        with cg.spawn(bomb, ["pid", "mnt"]):
            df = cg.sample(1.0, 0.2)
            assert cg_lab.run(["true"]).exit_code == 0, "the host must stay usable"
        assert df.pids_current.max() <= 24 and df.pids_refused.iloc[-1] > 0
        assert cg.stats()["procs"] == []


@pytest.mark.privileged
def test_process_joins_before_its_namespaces(cg_lab):
    with cg_lab.cgroup("t-join", pids=8) as cg:
        rec = cg.run(["cat", "/proc/self/cgroup"], ["cgroup", "pid", "mnt"])
        lines = rec.stdout.split()
        assert lines and all(line.endswith(":/") for line in lines if line.split(":")[1] in ("", "pids", "memory"))
        with cg.spawn((), ["pid", "mnt"]) as p:
            assert cg.stats()["procs"] == [p.pid], "only PID 1 of the namespace is in the group, not its waiter"


@pytest.mark.privileged
def test_cpuset_pins_the_process(cg_lab):
    with cg_lab.cgroup("t-pin", cpuset="0") as cg:
        with cg.spawn((), ["pid", "mnt"]) as p:
            status = cg_lab.read_file(f"/proc/{p.pid}/status")["text"]
            allowed = [ln.split()[1] for ln in status.splitlines() if ln.startswith("Cpus_allowed_list")]
            assert allowed == ["0"]


@pytest.mark.privileged
def test_cpu_weight_divides_a_contended_cpu(cg_lab):
    loop = ["sh", "-c", "while :; do :; done"]
    with cg_lab.cgroup("t-light", cpuset="0", cpu_weight=100) as light, \
            cg_lab.cgroup("t-heavy", cpuset="0", cpu_weight=400) as heavy:
        with light.spawn(loop, ["pid", "mnt"]), heavy.spawn(loop, ["pid", "mnt"]):
            a0, b0 = light.stats()["cpu_usage_us"], heavy.stats()["cpu_usage_us"]
            import time
            time.sleep(1.5)
            a1, b1 = light.stats()["cpu_usage_us"], heavy.stats()["cpu_usage_us"]
        ratio = (b1 - b0) / max(1, a1 - a0)
        assert ratio > 2, f"weight 400 vs 100 on one CPU should get about 4x the CPU, got {ratio:.1f}x"


@pytest.mark.privileged
def test_swap_is_limited_where_the_host_accounts_it(cg_lab):
    mode = cg_lab.cgroup_mode()["mode"]
    with cg_lab.cgroup("t-swap", memory="64M", swap="16M") as cg:
        files = {os.path.basename(s["path"]): s["detail"] for s in cg.record.steps if s["op"] == "write"}
        d = cg_lab.cgroup_mode()["v2_mount"] + "/labkit/t-swap" if mode == "v2" else None
        if mode == "v2" and cg_lab.read_file(d + "/memory.swap.max")["exists"]:
            assert files["memory.swap.max"] == repr(str(16 << 20))
        elif mode != "v2" and "memory.memsw.limit_in_bytes" in files:
            assert files["memory.memsw.limit_in_bytes"] == repr(str(80 << 20))  # v1: memory + swap together


@pytest.mark.privileged
def test_dockers_device_allow_list_holds_without_nodev(cg_lab):
    """The kernel's device controller alone (v1 devices.allow here, a BPF program in the v2 guest): in a
    group with devices='docker', a node for /dev/zero opens and one for /dev/kmsg does not, on a filesystem (/var/tmp)
    that allows device nodes; in a plain group both open (so the test can fail)."""
    script = ("d=$(mktemp -d /var/tmp/labkit-devtest.XXXXXX) && mknod $d/zero c 1 5 && mknod $d/kmsg c 1 11 && "
              "head -c 4 $d/zero | wc -c; : < $d/kmsg && echo kmsg-open; rm -rf $d")
    with cg_lab.cgroup("t-devices", devices="docker") as cg:
        rec = cg.run(["sh", "-c", script], [])
        assert "devices" in cg.record.facts and "not enforced" not in cg.record.facts["devices"], cg.record.facts
    assert rec.stdout.split() == ["4"], rec.stdout + rec.stderr
    assert "Operation not permitted" in rec.stderr
    with cg_lab.cgroup("t-nodevices") as cg:
        plain = cg.run(["sh", "-c", script], [])
    assert plain.stdout.split() == ["4", "kmsg-open"], plain.stdout + plain.stderr
