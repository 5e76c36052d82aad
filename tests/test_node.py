"""labkit.agent.node: a cluster's "machines" on one host, each with its own namespaces, cgroup subtree and engine."""
import glob
import os
import time
import urllib.request

import pytest

from labkit.agent import cgroups, node
from labkit.agent.runner import Recorder
from labkit.client.lab import Lab
from labkit.client.transport import UnixSocket
from labkit.wire.errors import Conflict, InvalidSpec, NotFound
from labkit.wire.specs import NetworkSpec, NodeSpec

pytestmark = pytest.mark.privileged

NET = "cltst"


@pytest.fixture
def cluster():
    from labkit.agent.local import InProcess
    lab = Lab(InProcess(), target="local")
    lab.call("net.create", spec=NetworkSpec(name=NET, subnet="10.209.7.0/24").to_dict())
    made = []

    def make(name, ip=None):
        rec = lab.call("node.create", spec=NodeSpec("tst", name, NET, ip).to_dict())
        made.append(rec["id"])
        return rec
    try:
        yield lab, make
    finally:
        for n in made:
            try:
                lab.call("node.remove", node_id=n)
            except NotFound:
                pass
        lab.call("net.remove", name=NET)
        lab.close()


def _engine(rec):
    return Lab(UnixSocket(rec["facts"]["socket"]), target="node")


def _http(url, seconds=10):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_node_is_a_machine_of_its_own_with_an_engine_and_a_published_port(cluster):
    lab, make = cluster
    a, b = make("n1", "10.209.7.11"), make("n2")
    assert a["facts"]["ip"] == "10.209.7.11" and b["facts"]["ip"].startswith("10.209.7.")
    assert {n["id"]: n["status"] for n in lab.call("node.list")} == {"tst-n1": "ready", "tst-n2": "ready"}
    for ns in ("net", "pid", "mnt", "uts", "ipc", "cgroup"):
        assert os.readlink(f"/proc/{a['facts']['pid']}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    eng = _engine(a)
    try:
        eng.call("net.create", spec=NetworkSpec(name="tasks", subnet="10.214.1.0/24").to_dict())
        c = eng.create("busybox", ["httpd", "-f", "-p", "80", "-h", "/etc"], name="web", network="tasks",
                       ports=["8080:80"])
        c.start()
        assert "root:" in _http("http://10.209.7.11:8080/passwd"), "the node's address, its published port"
        info = c.inspect()
        assert info["NetworkSettings"]["IPAddress"].startswith("10.214.1.")
        # the node's container is a cgroup below the node's, on the host
        assert glob.glob(f"/sys/fs/cgroup/*/labkit/node-tst-n1/labkit/*{c.id}*") or \
            glob.glob(f"/sys/fs/cgroup/labkit/node-tst-n1/labkit/*{c.id}*"), "nested under the node's cgroup"
        assert [r["name"] for r in eng.containers(all=True)] == ["web"]
        assert _engine(b).containers(all=True) == [], "each node has a container store of its own"
        pids = cgroups.pids("node-tst-n1")
        assert len(pids) >= 3, "PID 1, the engine and the container at least"
    finally:
        eng.close()
    lab.call("node.pause", node_id="tst-n1")
    assert lab.call("node.inspect", node_id="tst-n1")["status"] == "paused"
    with pytest.raises(OSError):
        urllib.request.urlopen("http://10.209.7.11:8080/passwd", timeout=1).read()  # a hung machine
    lab.call("node.resume", node_id="tst-n1")
    assert "root:" in _http("http://10.209.7.11:8080/passwd") and \
        lab.call("node.inspect", node_id="tst-n1")["status"] == "ready"
    lab.call("node.pause", node_id="tst-n1")  # killed while frozen: it goes all the same
    lab.call("node.kill", node_id="tst-n1")
    assert lab.call("node.inspect", node_id="tst-n1")["status"] == "down"
    assert cgroups.pids("node-tst-n1") == [], "everything on the node went at once"
    assert all(not os.path.exists(f"/proc/{p}") for p in pids)
    assert lab.call("node.inspect", node_id="tst-n2")["status"] == "ready", "the other node goes on"
    lab.call("node.remove", node_id="tst-n1")
    assert [n["id"] for n in lab.call("node.list")] == ["tst-n2"]
    assert not glob.glob("/sys/fs/cgroup/*/labkit/node-tst-n1") and not os.path.exists(f"{node.NODES_DIR}/tst-n1")


def test_cleanup_removes_a_node_left_running(cluster):
    lab, make = cluster
    make("left")
    assert "node tst-left" in lab.call("cleanup", dry_run=True)["facts"]["found"]
    node.cleanup(Recorder("cleanup"))
    assert lab.call("node.list") == [] and not os.path.exists(f"{node.NODES_DIR}/tst-left")
    assert not glob.glob("/sys/fs/cgroup/*/labkit/node-tst-left")


def test_refusals(cluster):
    lab, make = cluster
    make("dup")
    with pytest.raises(Conflict):
        lab.call("node.create", spec=NodeSpec("tst", "dup", NET).to_dict())
    for bad in ({"cluster": "../x", "name": "a", "network": NET}, {"cluster": "tst", "name": "a/b", "network": NET},
                {"cluster": "tst", "name": "-a", "network": NET}, {"cluster": "tst", "name": "a", "network": NET,
                                                                   "ip": "10.0.0.300"},
                {"cluster": "tst", "name": "a", "network": NET, "evil": 1}):
        with pytest.raises(InvalidSpec):
            lab.call("node.create", spec=bad)
    for bad in ("../../etc/passwd", "tst-nope", "", "x" * 300):
        with pytest.raises(NotFound):
            lab.call("node.remove", node_id=bad)


def test_a_node_is_reached_in_its_own_run_dir_even_where_the_host_runs_a_daemon(cluster):
    """In the lab VM labkitd listens on the host's /run/labkit/labkitd.sock: until a node's PID 1 has mounted
    its own /run/labkit, the node's socket path led there, and node.create took the host's daemon for the
    node's (its requests then made the node's networks on the host). Here a listener stands in for the
    host's daemon where none runs."""
    import socket
    from labkit.wire.specs import RUN_DIR
    lab, make = cluster
    host_sock, fake = f"{RUN_DIR}/labkitd.sock", None
    if not os.path.exists(host_sock):
        fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fake.bind(host_sock)
        fake.listen(8)
    try:
        rec = make("own")
        nets = lab.call("node.call", node_id=rec["id"], op="net.list")
        assert [n["spec"]["name"] for n in nets] == [], "the node's engine, not the host's, answered"
        assert lab.call("node.inspect", node_id=rec["id"])["status"] == "ready"
    finally:
        if fake is not None:
            fake.close()
            os.unlink(host_sock)
