"""The agent test subset: the same checks over the in-process, sudo and SSH transports."""
import pytest

from labkit.errors import CommandFailed, InvalidSpec, NotFound

pytestmark = pytest.mark.privileged


def test_hello_names_protocol_and_root(any_lab):
    h = any_lab.info
    assert h["hello"] == "labkit-agent" and h["protocol"] >= 1
    assert h["euid"] == 0, "the agent must run as root on every transport"


def test_run_on_target(any_lab):
    res = any_lab.run(["id", "-u"])
    assert res.exit_code == 0 and res.stdout.strip() == "0"
    with pytest.raises(CommandFailed) as err:
        any_lab.run(["false"], check=True)
    assert err.value.exit_code == 1


def test_doctor_has_every_line(any_lab):
    rep = any_lab.doctor()
    names = {line["check"] for line in rep.lines}
    for want in ("kernel", "cgroups", "overlayfs", "namespaces", "veth/bridge", "iptables/nft", "kvm", "busybox",
                 "vm kernel", "qemu"):
        assert want in names
    assert rep["cgroups"]["value"] in ("v1", "v2", "hybrid")
    assert rep["namespaces"]["status"] == "ok"


def test_rootfs_lifecycle(any_lab):
    r = any_lab.rootfs("t-agent", replace=True)
    try:
        assert "busybox" in r.listdir("/bin") and "sh" in r.listdir("/bin")
        res = any_lab.chroot(r, ["cat", "/etc/os-release"])
        assert "labkit busybox" in res.stdout
        assert any(s.get("call") == "chroot" for s in res.steps)
    finally:
        r.remove()
    with pytest.raises(NotFound):
        any_lab.call("rootfs.info", name="t-agent")


def test_namespaces_are_new_and_reported(any_lab):
    host = any_lab.host_namespaces()
    rec = any_lab.run_in(["hostname"], ["uts", "pid", "net"], hostname="agentbox")
    assert rec.stdout.strip() == "agentbox"
    ns = rec.facts["ns"]
    assert ns["uts"] != host["uts"] and ns["pid"] != host["pid"] and ns["net"] != host["net"]
    assert ns["mnt"] == host["mnt"]
    assert rec.facts["shares_with_host"] == {n: n not in ("uts", "pid", "net") for n in host}
    assert rec.facts["view"]["pid"] == 1
    assert rec.facts["view"]["links"] == ["lo"]
    assert [s["call"] for s in rec.steps if s["kind"] == "syscall"][:2] == ["unshare", "fork"]
    assert any_lab.read_file("/proc/sys/kernel/hostname")["text"].strip() != "agentbox"


def test_spawned_process_lives_until_stopped(any_lab):
    p = any_lab.spawn(namespaces=["uts", "pid", "mnt", "user"], hostname="held")
    try:
        info = p.inspect()
        assert info["alive"] and info["nspid"][-1] == 1
        assert info["uid_map"] == "0 100000 65536"
        assert any_lab.read_file(f"/proc/{p.pid}/status")["exists"]
        assert p.exec(["hostname"]).stdout.strip() == "held"
    finally:
        p.stop()
    assert not any_lab.read_file(f"/proc/{p.pid}/cmdline")["text"]


def test_escape_works_under_chroot_and_fails_under_pivot_root(any_lab):
    r = any_lab.rootfs("t-escape", replace=True)
    try:
        assert any_lab.escape(r).facts["view"]["escaped"] is True
        held = any_lab.escape(r, pivot_root=True)
        assert held.facts["view"]["escaped"] is False
        assert "pivot_root" in [s.get("call") for s in held.steps]
    finally:
        r.remove()


def test_agent_refuses_bad_input(any_lab):
    # the client validates first; the agent validates again whatever arrives on the wire
    with pytest.raises(InvalidSpec, match="unknown namespace"):
        any_lab.call("proc.run", spec_dict={"argv": ["true"], "namespaces": ["nope"]})
    with pytest.raises(InvalidSpec, match="host itself"):
        any_lab.call("proc.run", spec_dict={"argv": ["true"], "rootfs": "/"})
    with pytest.raises(InvalidSpec, match="outside labkit"):
        any_lab.call("proc.run", spec_dict={"argv": ["true"], "rootfs": "/etc"})
    with pytest.raises(InvalidSpec, match="not allowed"):
        any_lab.call("rootfs.create", name="../../etc")
    with pytest.raises(InvalidSpec, match="no method"):
        any_lab.call("rm_rf_everything")


def test_probe_bench_and_vm_over_every_transport(any_lab):
    """The isolation probe, a slice of the harness (container path included) and, outside the lab VM, a
    VM whose handle lives in the agent process, all through the protocol."""
    from labkit import bench, isolation
    r = any_lab.rootfs("t-transport", replace=True)
    try:
        configs = [c for c in isolation.default_configs(r.name) if c[0] in ("plain process", "container")]
        res = any_lab.isolation_matrix(configs=configs, rootfs=r.name)
        assert res.matrix.loc["plain process"].sum() == 6 and res.matrix.loc["container", "host PIDs"] == 0
    finally:
        r.remove()
    out = bench.Bench(any_lab, experiments=["cpu", "net-latency"], cases=["native", "container"], repeats=1,
                      progress=False).run()
    assert set(out.samples["case"]) == {"native", "container", "container (bridge)", "container (NAT)"}
    assert out.env["cgroup_mode"] in ("v1", "v2", "hybrid")
    if any_lab.target == "vagrant":
        return  # a VM inside the TCG-emulated lab VM would take minutes to boot; the host's tests cover it
    with any_lab.vm_start(accel="tcg") as vm:
        assert vm.exec("echo $((6 * 7))")["stdout"] == "42\n"
    assert vm.id not in [v["id"] for v in any_lab.call("vm.list")]
