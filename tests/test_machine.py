"""labkit.agent.machine: cluster nodes that are computers of their own (lab 09's multi-VM option), for real.

On this host: what an agent that is no cluster worker refuses (a power cut, routes, a mesh: any labkit client
could otherwise power off a student's laptop), and a cluster across machines refused before anything is made
where the machine has no cluster key. In the VM tier (the multi-machine Vagrantfile, three TCG guests): a cluster
whose workers are the worker VMs, a 3-replica service with a published port answering on the manager and on a
worker's address, an image made on the manager handed to the workers, one worker VM's power cut, its replicas
back on the others, everything undone; and lab 09 run as a student runs it on the three VMs, at full points."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from labkit.agent import machine
from labkit.wire.errors import InvalidSpec, NotFound, PrivilegeError
from labkit.wire.specs import ClusterSpec, NodeSpec

WORKERS = ["192.168.56.11", "192.168.56.12"]  # what LABKIT_VM_NODES=3 vagrant up makes


@pytest.mark.parametrize("bad", [["127.0.0.1"], ["8.8.8.8"], ["192.168.56.11"] * 2, ["10.209.0.20"], "192.168.56.11",
                                 ["192.168.56.300"], ["169.254.1.1"], [3232249867]])
def test_machines_that_are_not_private_addresses_of_other_computers_are_refused(bad):
    with pytest.raises(InvalidSpec):
        ClusterSpec(name="tm", machines=bad)


def test_a_cluster_of_machines_has_a_worker_on_each():
    with pytest.raises(InvalidSpec, match="a worker runs on each machine"):
        ClusterSpec(name="tm", workers=5, machines=WORKERS)
    spec = ClusterSpec(name="tm", machines=WORKERS)
    assert spec.workers == 2 and spec.machine_of(0) is None and spec.machine_of(2) == WORKERS[1]
    assert ClusterSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(InvalidSpec):
        NodeSpec(cluster="tm", name="worker1", network="cltm", machine="127.0.0.1")


def _routes():
    return subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout


@pytest.mark.privileged
def test_an_agent_that_is_no_cluster_worker_refuses_a_power_cut_routes_and_a_mesh(lab):
    """The attack: any client of any labkit agent asking machine.poweroff (the host would go down at once), or
    machine.join/mesh re-routing the host's traffic. Only a worker VM (provision.sh --worker) accepts them."""
    assert not os.path.exists(machine.WORKER_MARK), "this host must not be marked a cluster worker"
    before = _routes()
    with pytest.raises(PrivilegeError, match="not a cluster worker") as err:
        lab.call("machine.poweroff")
    assert "cluster.create" in err.value.fix
    with pytest.raises(PrivilegeError):
        lab.call("machine.join", cluster="tm", routes=[["10.214.1.0/24", "192.168.56.11"]],
                 unreachable="10.214.255.0/24")
    with pytest.raises(PrivilegeError):
        lab.call("machine.mesh", cluster="tm", ports=[[8080, "tcp", 80, ["10.214.1.2"]]], vips=[])
    with pytest.raises(PrivilegeError):  # (nor does it take layers and images from anyone who asks)
        lab.call("machine.blob_put", digest="sha256:" + "0" * 64, token="0" * 16, offset=0, data="", last=True)
    with pytest.raises(PrivilegeError):
        lab.call("machine.image_put", ref="busybox", layers=["sha256:" + "0" * 64], config={})
    assert _routes() == before and not os.path.exists(f"{machine.RECORDS}/tm.json")
    said = lab.call("machine.hello")
    assert said["worker"] is False
    assert said["boot_id"] == open("/proc/sys/kernel/random/boot_id").read().strip()
    # and a node's engine is never asked a machine.* request through node.call (a student's relay)
    with pytest.raises(InvalidSpec, match="host's to do"):
        lab.call("node.call", node_id="tm-worker1", op="machine.poweroff")


@pytest.mark.privileged
def test_a_cluster_across_machines_needs_the_cluster_key_and_makes_nothing_without_it(lab):
    assert not os.path.exists(machine.KEY)
    with pytest.raises(InvalidSpec, match="no cluster key") as err:
        lab.call("cluster.create", spec=ClusterSpec(name="tm", machines=WORKERS).to_dict())
    assert "LABKIT_VM_NODES=3 vagrant up" in err.value.fix
    with pytest.raises(NotFound):
        lab.call("cluster.inspect", name="tm")
    assert not any(n["id"].startswith("tm-") for n in lab.call("node.list"))


def _layer(tmp_path, text):
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("pushed.txt")
        info.size, info.mode = len(text), 0o644
        tar.addfile(info, io.BytesIO(text))
    blob = buf.getvalue()
    import hashlib
    return blob, "sha256:" + hashlib.sha256(blob).hexdigest()


@pytest.mark.privileged
def test_a_worker_takes_an_image_layer_by_layer_and_refuses_what_is_not_it(tmp_path, monkeypatch):
    """A worker's side of machine.push_image, called here as a worker's agent would be (the worker mark stands in
    a file of this test's; the store is this host's, and the image is removed after). The attacks: a piece out of
    order, a blob whose bytes are not its digest, a token that climbs out of the upload directory, a link planted
    where the upload goes, an image record naming layers that are not there, a config that is no config."""
    import base64
    from labkit.agent import store
    from labkit.wire.errors import Conflict, UnsafeLayer
    mark = tmp_path / "worker"
    mark.write_text("")
    monkeypatch.setattr(machine, "WORKER_MARK", str(mark))
    monkeypatch.setattr(machine, "INCOMING", str(tmp_path / "incoming"))
    blob, digest = _layer(tmp_path, f"pushed at {time.time()}\n".encode())
    ref, config = "tm-pushed:v1", {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"}
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    try:
        assert machine.image_have(ref, [digest], config) == {"same": False, "missing": [digest]}
        with pytest.raises(NotFound, match="not here"):
            machine.image_put(ref, [digest], config)
        with pytest.raises(InvalidSpec, match="16 hex"):
            machine.blob_put(digest, "../../../etc/x", 0, b64(blob), True)
        for bad in ({"digest": 5}, {"data": None}, {"data": "not base64!"}, {"offset": True}, {"offset": -1}):
            with pytest.raises(InvalidSpec):  # (every refusal a LabkitError, none an agent crash)
                machine.blob_put(**dict({"digest": digest, "token": "d" * 16, "offset": 0, "data": b64(blob),
                                         "last": True}, **bad))
        stale = tmp_path / "incoming" / f"{digest[7:]}.{'e' * 16}.part"
        stale.parent.mkdir(mode=0o700, exist_ok=True)
        stale.write_bytes(blob[:10])
        os.utime(stale, (time.time() - machine.STALE_UPLOAD - 5,) * 2)
        assert machine.incoming() == [stale.name]
        token = "a" * 16
        machine.blob_put(digest, token, 0, b64(blob[:700]), False)
        assert not stale.exists(), "an upload abandoned long ago goes when a new one begins"
        with pytest.raises(Conflict, match="not 600"):
            machine.blob_put(digest, token, 600, b64(blob[600:]), True)
        with pytest.raises(Conflict, match="began already"):
            machine.blob_put(digest, token, 0, b64(blob), True)
        victim = tmp_path / "victim"
        victim.write_text("mine")
        os.symlink(victim, f"{machine.INCOMING}/{digest[7:]}.{'b' * 16}.part")
        with pytest.raises(Conflict):
            machine.blob_put(digest, "b" * 16, 0, b64(blob), True)
        assert victim.read_text() == "mine", "a link planted where the upload goes is not followed"
        with pytest.raises(UnsafeLayer):  # bytes that are not the digest's: refused, and the piece gone
            machine.blob_put(digest, "c" * 16, 0, b64(blob[:-1] + b"x"), True)
        assert not os.path.exists(f"{machine.INCOMING}/{digest[7:]}.{'c' * 16}.part")
        assert machine.image_have(ref, [digest], config)["missing"] == [digest]
        said = machine.blob_put(digest, token, 700, b64(blob[700:]), True)
        assert said == {"digest": digest, "bytes": len(blob)}
        with pytest.raises(InvalidSpec, match="KEY=VALUE"):
            machine.image_put(ref, [digest], {"Env": ["no equals sign"]})
        with pytest.raises(InvalidSpec):
            machine.image_put(ref, ["sha256:../../x"], config)
        made = machine.image_put(ref, [digest], config, history=[{"created_by": "the manager"}, "junk"])
        assert store.load_image(ref)["layers"] == [digest] and made["id"] == store.load_image(ref)["id"]
        assert machine.image_have(ref, [digest], config) == {"same": True, "missing": []}
        assert open(os.path.join(store.layer_dir(digest), "pushed.txt")).read().startswith("pushed at")
        # a layer unpacked here whose blob went (a crash, a full disk): forged bytes under its digest are refused
        os.unlink(store.blob_path(digest))
        assert machine.image_have(ref, [digest], config)["missing"] == [digest]
        with pytest.raises(UnsafeLayer):
            machine.blob_put(digest, "f" * 16, 0, b64(blob[:-1] + b"y"), True)
        assert not os.path.exists(store.blob_path(digest))
        machine.blob_put(digest, "f" * 16, 0, b64(blob), True)
        assert os.path.isfile(store.blob_path(digest)) and machine.image_have(ref, [digest], config)["same"]
    finally:
        if store.read_image(ref):
            store.rmi(ref)


NS, HERE, THERE = "tmachine", "10.250.77.1", "10.250.77.2"  # (not lk-*: those are labkit cleanup's)


def _sh(*argv):
    subprocess.run(list(argv), check=True, capture_output=True)


def _start_sshd(d):
    sshd = shutil.which("sshd", path="/usr/sbin:/usr/bin")
    with open(d / "sshd.log", "ab") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", NS, sshd, "-D", "-e", "-f", str(d / "sshd_config")],
                                stdout=subprocess.DEVNULL, stderr=log)
    end = time.monotonic() + 10
    while subprocess.run(["ip", "netns", "exec", NS, "ss", "-ltn", "sport = :22"], capture_output=True,
                         text=True).stdout.count("LISTEN") == 0:
        assert time.monotonic() < end and proc.poll() is None, (d / "sshd.log").read_text()
        time.sleep(0.05)
    return proc


@pytest.fixture
def worker_sshd(tmp_path, monkeypatch):
    """A worker machine's SSH for the manager's side of the channel: a real sshd in a network namespace this test
    makes, at a private address behind a veth, whose key runs labkit's agent as root (the forced command that
    provision.sh --worker writes). The agent it runs is this host's own, not another computer's: this stands in
    for the SSH path, the pool and its failures, not for a second kernel (the VM tier below has those)."""
    _sh("ip", "netns", "add", NS)
    started = []
    try:
        _sh("ip", "link", "add", "tmach0", "type", "veth", "peer", "name", "tmach1", "netns", NS)
        _sh("ip", "addr", "add", f"{HERE}/30", "dev", "tmach0")
        _sh("ip", "link", "set", "tmach0", "up")
        for cmd in (["addr", "add", f"{THERE}/30", "dev", "tmach1"], ["link", "set", "tmach1", "up"],
                    ["link", "set", "lo", "up"]):
            _sh("ip", "-n", NS, *cmd)
        for name in ("host_key", "client_key"):
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name))
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        (tmp_path / "authorized_keys").write_text(
            f'restrict,from="{HERE}",command="env PYTHONPATH={repo} {sys.executable} -m labkit.agent" '
            + (tmp_path / "client_key.pub").read_text())
        (tmp_path / "sshd_config").write_text(
            f"Port 22\nListenAddress {THERE}\nHostKey {tmp_path}/host_key\n"
            f"AuthorizedKeysFile {tmp_path}/authorized_keys\n"
            f"PidFile {tmp_path}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "PermitRootLogin prohibit-password\nLogLevel ERROR\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        started.append(_start_sshd(tmp_path))
        monkeypatch.setattr(machine, "KEY", str(tmp_path / "client_key"))
        monkeypatch.setattr(machine, "KNOWN_HOSTS", str(tmp_path / "known_hosts"))
        monkeypatch.setattr(machine, "USER", "root")
        yield {"address": THERE, "dir": tmp_path, "sshd": started}
    finally:
        machine.forget(THERE)
        for proc in started:
            proc.kill()
            proc.wait()
        for pid in subprocess.run(["ip", "netns", "pids", NS], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), 9)  # (the agents its sessions started)
        subprocess.run(["ip", "netns", "delete", NS], capture_output=True)


@pytest.mark.privileged
def test_the_managers_channels_to_a_machine_are_pooled_bounded_and_pinned(worker_sshd):
    """Over a real sshd: a channel is opened once and used again (one agent there, not one per request); requests
    at once get channels of their own; an error answer keeps its channel, a request out of time breaks only its
    own; the worker's host key is learned on first contact and then pinned (a changed one is refused, with the
    ssh-keygen -R that makes it right); a machine whose SSH is gone fails fast, and is reached again when back."""
    import threading
    from labkit.wire.errors import TransportError
    at = worker_sshd["address"]
    assert at not in machine._idle
    said = machine.call(at, "machine.hello", timeout=30)
    assert said["worker"] is False and said["boot_id"] == open("/proc/sys/kernel/random/boot_id").read().strip()
    [chan] = machine._idle[at]
    assert machine.call(at, "machine.hello", timeout=5) and machine._idle[at] == [chan], "the same channel, again"
    held = machine._open(at, 5)  # a request under way on it (a health check that takes seconds)
    assert machine.call(at, "machine.hello", timeout=60) and machine._idle[at] != [held], "a channel of its own"
    machine._give_back(at, held)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(machine.call(at, "machine.hello", timeout=60)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 8 and 2 <= len(machine._idle[at]) <= machine.POOL
    pooled = len(machine._idle[at])
    with pytest.raises(NotFound):
        machine.call(at, "container.inspect", {"ref": "no-such-box"}, timeout=10)
    assert len(machine._idle[at]) == pooled, "an error answered by the agent keeps its channel"
    with pytest.raises(TransportError, match="did not answer bench.net_measure"):  # (it retries a refused port)
        machine.call(at, "bench.net_measure", {"ip": "127.0.0.1", "port": 9, "mode": "latency", "amount": 1},
                     timeout=1)
    assert len(machine._idle[at]) == pooled - 1, "the channel out of time is closed; the others stay"
    with pytest.raises(InvalidSpec, match="_timeout"):
        machine.call(at, "machine.hello", {"_timeout": 1})
    assert THERE in (worker_sshd["dir"] / "known_hosts").read_text(), "the host key, learned"

    machine.forget(at)  # a worker made anew: another host key at the same address
    worker_sshd["sshd"][0].kill()
    worker_sshd["sshd"][0].wait()
    for f in ("host_key", "host_key.pub"):
        os.unlink(worker_sshd["dir"] / f)
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(worker_sshd["dir"] / "host_key"))
    worker_sshd["sshd"].append(_start_sshd(worker_sshd["dir"]))
    with pytest.raises(TransportError) as err:
        machine.call(at, "machine.hello", timeout=30)
    assert f"ssh-keygen -R {at}" in err.value.fix, err.value

    worker_sshd["sshd"][-1].kill()  # the machine's SSH gone (a power cut, as the manager sees it)
    worker_sshd["sshd"][-1].wait()
    _sh("ssh-keygen", "-q", "-R", at, "-f", str(worker_sshd["dir"] / "known_hosts"))
    machine.forget(at)
    t0 = time.monotonic()
    with pytest.raises(TransportError):
        machine.call(at, "machine.hello", timeout=30)
    with pytest.raises(TransportError, match="does not answer"):
        machine.call(at, "container.ps", timeout=3)  # a heartbeat: no wait for a machine that was down
    assert time.monotonic() - t0 < 15, "a machine that refuses is not waited for"
    worker_sshd["sshd"].append(_start_sshd(worker_sshd["dir"]))
    time.sleep(machine.RETRY_AFTER)
    assert machine.call(at, "machine.hello", timeout=machine.HELLO_TIMEOUT)["worker"] is False, "reached again"


@pytest.mark.privileged
@pytest.mark.vm
@pytest.mark.slow
def test_a_cluster_runs_across_three_vms_and_rolls_out_an_image_made_on_the_manager(vm_tier):
    """The multi-machine Vagrantfile's manager and two worker VMs, one cluster over the same API as on one
    host: spread over the machines, the routing mesh on every machine and on the manager's 127.0.0.1, an image
    built on the manager rolled out to tasks on the workers; cluster.remove undoes it on the workers."""
    from labkit.wire.orchestration import ServiceSpec
    assert vm_tier.nodes == 3, "the VM tier boots the manager and two workers (LABKIT_VM_NODES=3)"
    lab = vm_tier.lab()
    try:
        made = lab.call("cluster.create", spec=ClusterSpec(name="tm", subnet="10.209.13.0/24", tasks="10.223.0.0/16",
                                                           machines=WORKERS).to_dict())
        nodes = {n["name"]: n for n in made["cluster"]["nodes"]}
        assert {k: (v["ip"], v["tasks"], v["status"]) for k, v in nodes.items()} == {
            "manager": ("10.209.13.10", "10.223.0.0/24", "ready"),
            "worker1": (WORKERS[0], "10.223.1.0/24", "ready"),
            "worker2": (WORKERS[1], "10.223.2.0/24", "ready")}
        web = ("sh", "-c", "mkdir -p /tmp/w && hostname > /tmp/w/index.html && exec httpd -f -p 80 -h /tmp/w")
        lab.call("service.create", name="tm", spec=ServiceSpec(name="web", image="busybox", replicas=3, cmd=web,
                                                               ports=("18497:80",)).to_dict())

        def running():
            return [t for t in lab.call("service.ps", name="tm")
                    if t["desired"] == "running" and t["state"] == "running"]

        def settle(ok, seconds=300):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                lab.call("manager.step", name="tm", _timeout=120)
                if ok(running()):
                    return running()
                time.sleep(0.2)
            raise AssertionError(f"not settled: {lab.call('service.ps', name='tm')}")

        settle(lambda ts: sorted(t["node"] for t in ts) == ["manager", "worker1", "worker2"])

        def get(address):
            res = lab.run(["python3", "-c", "import urllib.request as u; print(u.urlopen("
                                            f"'http://{address}:18497/', timeout=10).read().decode())"])
            return res.stdout.strip() if res.exit_code == 0 else None

        for _ in range(3):
            lab.call("manager.step", name="tm", _timeout=120)  # (the mesh is written once the tasks run)
        answers = {a: [get(a) for _ in range(6)] for a in ("127.0.0.1", WORKERS[0])}
        assert None not in answers["127.0.0.1"] + answers[WORKERS[0]], f"every request answered: {answers}"
        # a task's page is its hostname, its container's id: three different ones are the three tasks, one on
        # each machine. The manager VM's own 127.0.0.1 reaches the workers' tasks out of eth1 only with
        # route_localnet there (without it the kernel drops the DNATed SYN, and its retry lands elsewhere)
        assert len(set(answers[WORKERS[0]])) == 3, f"worker1's mesh took turns over the 3 tasks: {answers}"
        assert len(set(answers["127.0.0.1"])) == 3, f"the manager's 127.0.0.1 took turns over the 3: {answers}"
        dev = lab.run(["ip", "-o", "route", "get", WORKERS[0]]).stdout.split("dev")[1].split()[0]
        localnet = ["sysctl", "-n", f"net.ipv4.conf.{dev}.route_localnet"]
        assert lab.run(localnet).stdout.strip() == "1"

        # an image made on the manager VM only: each worker VM is handed its layers before its task starts
        lab.build("FROM busybox\nRUN echo v2 > /v2\n", "tm/web:v2")
        lab.call("service.update", name="tm", service="web", image="tm/web:v2")
        settle(lambda ts: sorted(t["node"] for t in ts) == ["manager", "worker1", "worker2"]
               and all(t["image"].startswith("tm/web:v2") for t in ts))
        for _ in range(3):
            lab.call("manager.step", name="tm", _timeout=120)
        assert len({get(WORKERS[0]) for _ in range(6)}) == 3, "the updated tasks answer on every machine"

        boot = lab.call("node.inspect", node_id="tm-worker2")
        assert boot["status"] == "ready" and boot["machine"] == WORKERS[1]
        # (a worker VM's power cut, its replicas back elsewhere, and a cluster removed while a worker is off:
        # lab 09 does all of it in the test below, graded by its own checks)
        with pytest.raises(InvalidSpec, match="vagrant suspend"):
            lab.call("node.pause", node_id="tm-worker1")
        assert lab.call("machine.hello")["worker"] is False  # (the manager VM is no worker: it cannot be cut)
        on_w1 = "sudo ip route show; sudo nft list tables; sudo ls /run/labkit/machine; sudo PYTHONPATH=/labkit " \
                "python3 -m labkit.cli ps -a"
        before = vm_tier.vagrant("ssh", "worker1", "-c", on_w1).stdout
        assert "10.223.0.0/24 via 192.168.56.10" in before and "labkit_mesh_tm" in before and "tm.json" in before, \
            before
        assert lab.call("cluster.remove", name="tm", _timeout=300)["name"] == "tm"
        with pytest.raises(NotFound):
            lab.call("cluster.inspect", name="tm")
        assert lab.run(["ip", "route", "show", "10.223.1.0/24"]).stdout.strip() == "", "the manager's route went"
        assert lab.run(localnet).stdout.strip() == "0", f"{dev}'s route_localnet given back with the last network"
        after = vm_tier.vagrant("ssh", "worker1", "-c", on_w1).stdout
        assert "10.223." not in after and "labkit_mesh_tm" not in after and "tm.json" not in after \
            and "web." not in after, f"worker1 keeps nothing of the cluster:\n{after}"
    finally:
        try:
            if any(c["name"] == "tm" for c in lab.call("cluster.list")):
                lab.call("cluster.remove", name="tm", _timeout=300)
            if any(i["ref"].startswith("tm/web:") for i in lab.images()):
                lab.rmi("tm/web:v2", force=True)
        finally:
            lab.close()


@pytest.mark.privileged
@pytest.mark.vm
@pytest.mark.slow
def test_lab_09_scores_full_points_with_its_workers_on_the_worker_vms(vm_tier, tmp_path):
    """Lab 09 as a student runs it on the three VMs (parameter worker_vms): the same notebook, the same checks,
    full points; its workers read boot ids of their own, and exercise 5 cuts worker1's VM power."""
    from labkit.course.runbook import run_notebooks
    [run] = run_notebooks("vagrant", str(tmp_path), ["09-orchestration.ipynb"], parameters={"worker_vms": WORKERS})
    print(f"\nlab 09 across the VMs: {run.total} in {run.seconds:.0f} s")
    assert run.error is None, run.error
    points, most = run.total
    assert points == most > 0, [s for s in run.scores if s.get("points") != s.get("max_points")]
    import nbformat
    nb = nbformat.read(run.path, as_version=4)
    said = {c.id: "".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells if c.cell_type == "code"}
    kernels = {line.split()[0]: line for line in said["09-44"].splitlines() if "boot id" in line}
    assert "(the host's: one kernel)" in kernels["manager"], said["09-44"]
    assert all("(a kernel of its own: a VM)" in kernels[w] for w in ("worker1", "worker2")), said["09-44"]
    assert "vagrant up worker1" in said["09-46"]
    lab = vm_tier.lab()
    try:
        assert lab.call("cluster.list") == [], "the notebook removed its cluster"
    finally:
        lab.close()
