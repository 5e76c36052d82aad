"""The agent test subset: the same checks over the in-process, sudo and SSH transports."""
import pytest

from labkit.wire.errors import CommandFailed, InvalidSpec, NotFound

pytestmark = pytest.mark.privileged


def test_hello_names_protocol_and_root(any_lab):
    h = any_lab.info
    assert h["hello"] == "labkit-agent" and h["protocol"] >= 1
    assert h["euid"] == 0, "the agent must run as root on every transport"


def test_run_on_target(any_lab):
    res = any_lab.run(["id", "-u"])
    assert res.exit_code == 0 and res.stdout.strip() == "0"
    with pytest.raises(CommandFailed) as err:
        any_lab.run(["sh", "-c", "echo to-out; echo to-err >&2; exit 3"], check=True)
    assert err.value.exit_code == 3
    assert (err.value.stdout, err.value.stderr) == ("to-out\n", "to-err\n"), "output kept over every transport"


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
        any_lab.call("proc.run", spec={"argv": ["true"], "namespaces": ["nope"]})
    with pytest.raises(InvalidSpec, match="host itself"):
        any_lab.call("proc.run", spec={"argv": ["true"], "rootfs": "/"})
    with pytest.raises(InvalidSpec, match="outside labkit"):
        any_lab.call("proc.run", spec={"argv": ["true"], "rootfs": "/etc"})
    with pytest.raises(InvalidSpec, match="not allowed"):
        any_lab.call("rootfs.create", spec={"name": "../../etc"})
    with pytest.raises(InvalidSpec, match="no method"):
        any_lab.call("rm_rf_everything")


def test_probe_bench_and_vm_over_every_transport(any_lab):
    """The isolation probe, a slice of the harness (container path included) and, outside the lab VM, a
    VM whose handle lives in the agent process, all through the protocol."""
    from labkit.course import bench, isolation
    r = any_lab.rootfs("t-transport", replace=True)
    try:
        configs = [c for c in isolation.default_configs(r.name) if c[0] in ("plain process", "container")]
        res = isolation.isolation_matrix(any_lab, configs=configs, rootfs=r.name)
        assert res.matrix.loc["plain process"].sum() == len(isolation.BASIC) and res.matrix.loc["container", "host PIDs"] == 0
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


# -- hostile input: the agent is root, so every line and every value is an attack until checked ----------
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

from labkit.wire import protocol  # noqa: E402
from labkit.client import transport as T  # noqa: E402
from labkit.agent.local import InProcess
from labkit.wire.errors import ProtocolError  # noqa: E402
from labkit.client.lab import Lab  # noqa: E402


@pytest.fixture(params=["inprocess", "sudo"], scope="module")
def root_lab(request):
    """The in-process agent, and the agent as `sudo -n python3 agent.pyz` (started by root here, so the
    test needs no second user): the two ways in where a hostile line reaches the agent's own loop."""
    lab = Lab(InProcess() if request.param == "inprocess" else T.sudo_transport(), target=request.param)
    try:
        yield lab
    finally:
        lab.close()


def _peak_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_hostile_lines_do_not_kill_the_sudo_agent():
    """Raw lines to the real agent process (sudo -n python3 agent.pyz), as any client could write them:
    each is answered with a ProtocolError naming the client, and the agent answers the next request."""
    agent = subprocess.Popen(["sudo", "-n", "/usr/bin/python3", T.agent_zipapp()], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        hello = json.loads(agent.stdout.readline())
        pid = hello["pid"]

        def answer_to(*chunks):
            for chunk in chunks:
                agent.stdin.write(chunk)
            agent.stdin.flush()
            return json.loads(agent.stdout.readline())

        deep = answer_to(b"[" * 200000 + b"\n")           # formerly: RecursionError, the agent died
        assert deep["id"] is None and deep["error"]["type"] == "ProtocolError"
        assert deep["error"]["message"].startswith("the client sent") and "nest" in deep["error"]["message"]
        garbage = answer_to(b"\x00\xffnot json at all\n")
        assert "the client sent a line that is not JSON" in garbage["error"]["message"]
        assert "labkit.connect" in garbage["error"]["fix"]
        # five times the bound, in 1 MiB pieces: refused, and never held whole
        piece = b"a" * (1 << 20)
        huge = answer_to(*([piece] * (5 * protocol.MAX_LINE // len(piece))), b"\n")
        assert huge["error"]["type"] == "ProtocolError"
        assert f"a line of {5 * protocol.MAX_LINE + 1} bytes, more than" in huge["error"]["message"]
        assert _peak_rss_bytes(pid) < 3 * protocol.MAX_LINE
        ok = answer_to(b'{"id": 41, "method": "hello"}\n')
        assert ok["id"] == 41 and ok["ok"] is True and ok["result"]["pid"] == pid
        assert agent.poll() is None
    finally:
        agent.stdin.close()
        agent.wait(30)


def test_what_cannot_go_on_the_wire_is_refused_by_the_client(root_lab):
    deep = cur = []
    for _ in range(200000):
        cur.append([])
        cur = cur[0]
    with pytest.raises(ProtocolError) as err:
        root_lab.call("run", argv=deep)
    assert "the client tried to send" in err.value.message and err.value.fix
    with pytest.raises(ProtocolError, match="more than the protocol's limit"):
        root_lab.call("run", argv=["true"], input="x" * protocol.MAX_LINE)
    assert root_lab.call("run", argv=["echo", "still here"])["stdout"] == "still here\n"


def test_read_file_refuses_what_is_not_a_regular_file_and_reads_a_bounded_prefix(root_lab, tmp_path):
    with pytest.raises(InvalidSpec, match="character device, not a regular file") as err:
        root_lab.read_file("/dev/zero")                        # formerly: read until the agent ran out of memory
    assert "run(['dd'" in err.value.fix
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidSpec, match="a FIFO"):            # and opening it must not wait for a writer
        root_lab.read_file(str(tmp_path / "fifo"))
    with pytest.raises(InvalidSpec, match="a directory") as err:
        root_lab.read_file(str(tmp_path))
    assert "list_dir" in err.value.fix
    big = tmp_path / "big"
    big.write_bytes(b"0123456789" * 300000)
    part = root_lab.call("read_file", path=str(big), limit=1000)
    assert part["exists"] and part["truncated"] and part["text"] == "0123456789" * 100
    whole = root_lab.read_file(str(big))
    assert whole["truncated"] and len(whole["text"]) == 1 << 20
    for limit in (0, -1, "all", True, (8 << 20) + 1):
        with pytest.raises(InvalidSpec, match="limit"):
            root_lab.call("read_file", path=str(big), limit=limit)
    with pytest.raises(InvalidSpec, match="absolute"):
        root_lab.read_file("/etc/host\0name")
    assert root_lab.read_file("/proc/self/status")["text"].startswith("Name:")   # /proc: regular, size 0
    assert root_lab.read_file(str(tmp_path / "missing")) == {"path": str(tmp_path / "missing"), "exists": False,
                                                            "text": "", "truncated": False}


def test_the_agent_refuses_bad_values_before_making_anything(root_lab, tmp_path):
    with pytest.raises(InvalidSpec, match="not allowed"):
        root_lab.call("rootfs.create", spec={"name": "t-nl\n"})           # formerly: /var/lib/labkit/rootfs/t-nl<newline>
    assert not os.path.lexists("/var/lib/labkit/rootfs/t-nl\n")
    for spec, words in [({"name": "t-nl\n"}, "not allowed"),
                        ({"name": "t-bad", "period_us": "abc"}, "not a whole number"),   # formerly 'agent bug'
                        ({"name": "t-bad", "pids": 10 ** 9}, "out of range"),
                        ({"name": "t-bad", "memory": 10 ** 30}, "more than any lab machine"),
                        ({"name": "t-bad", "memory_max": 1}, "unknown cgroup option"),
                        ("t-bad", "must be an object")]:
        with pytest.raises(InvalidSpec, match=words):
            root_lab.call("cgroup.create", spec=spec)
    assert not {"t-bad", "t-nl\n"} & set(root_lab.call("cgroup.list"))
    marker = tmp_path / "pwned"
    for case in ("native", "container", "vm"):
        with pytest.raises(InvalidSpec, match="port") as err:
            root_lab.call("bench.net_serve", case=case, mode="latency", port=f"1; touch {marker}", ref="none",
                          vm_id="none")
        assert "1..65535" in err.value.fix
        with pytest.raises(InvalidSpec, match="out of range"):
            root_lab.call("bench.net_serve", case=case, mode="latency", port=70000, ref="none", vm_id="none")
    assert not marker.exists()
    with pytest.raises(InvalidSpec, match="IPv4"):
        root_lab.call("bench.net_measure", ip="999.1.1.1", port=80, mode="latency", amount=1)
    with pytest.raises(InvalidSpec, match="no method"):
        root_lab.call(["hello"])
    with pytest.raises(InvalidSpec, match="not a whole number"):
        root_lab.call("proc.run", spec={"argv": ["true"], "id_map": [[0, "abc", 1]]})
