"""labkit.agent.cluster: nodes on one host wired as one network, every task with an address of its own."""
import glob
import os
import subprocess

import pytest

from labkit.client.lab import Lab
from labkit.wire.errors import Conflict, InvalidSpec, NotFound, TransportError
from labkit.wire.specs import ClusterSpec, ContainerSpec

pytestmark = pytest.mark.privileged


@pytest.fixture
def lab():
    from labkit.agent.local import InProcess
    lab = Lab(InProcess(), target="local")
    try:
        yield lab
    finally:
        _remove_test_clusters(lab)
        lab.close()


def _remove_test_clusters(lab):
    for c in lab.call("cluster.list"):
        if c["name"].startswith("t"):
            lab.call("cluster.remove", name=c["name"])


def _run_on(lab, node_id, cmd, name, network="tasks"):
    spec = ContainerSpec(image="busybox", name=name, cmd=tuple(cmd), network=network)
    made = lab.call("node.call", node_id=node_id, op="container.create", params={"spec": spec.to_dict()})
    lab.call("node.call", node_id=node_id, op="container.start", params={"ref": made["id"]})
    return lab.call("node.call", node_id=node_id, op="container.inspect", params={"ref": made["id"]})


def test_tasks_on_two_nodes_reach_each_other_by_their_own_addresses(lab):
    lab.call("cluster.create", spec=ClusterSpec(name="tc", workers=1, subnet="10.209.9.0/24",
                                                tasks="10.215.0.0/16").to_dict())
    nodes = {n["name"]: n for n in lab.call("cluster.inspect", name="tc")["nodes"]}
    assert {k: (v["role"], v["ip"], v["tasks"], v["status"]) for k, v in nodes.items()} == {
        "manager": ("manager", "10.209.9.10", "10.215.0.0/24", "ready"),
        "worker1": ("worker", "10.209.9.11", "10.215.1.0/24", "ready")}
    web = _run_on(lab, "tc-worker1", ["httpd", "-f", "-p", "80", "-h", "/etc"], "web")
    ip = web["NetworkSettings"]["IPAddress"]
    assert ip.startswith("10.215.1."), "the worker's own range"
    # busybox's HTTP request over nc (busybox-static's wget crashes in its resolver on glibc hosts), a few tries
    # while the server starts
    get = f"printf 'GET /passwd HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 80"
    _run_on(lab, "tc-manager", ["sh", "-c", f"for i in 1 2 3 4 5 6 7 8 9 10; do {get} && break; sleep 0.2; done"],
            "client")
    res = lab.call("node.call", node_id="tc-manager", op="container.wait", params={"ref": "client",
                                                                                       "timeout": 30})
    logs = lab.call("node.call", node_id="tc-manager", op="container.logs", params={"ref": "client"})
    assert res["exit_code"] == 0 and "root:" in logs["text"], "a task on the manager reached one on the worker"
    route = subprocess.run(["ip", "route", "show", "10.215.1.0/24"], capture_output=True, text=True).stdout
    assert "via 10.209.9.11" in route, "the host routes the worker's range to the worker"
    with pytest.raises(Conflict):
        lab.call("cluster.create", spec=ClusterSpec(name="tc", workers=1, subnet="10.209.9.0/24",
                                                    tasks="10.215.0.0/16").to_dict())
    with pytest.raises(InvalidSpec):
        lab.call("node.call", node_id="tc-manager", op="node.remove", params={"node_id": "tc-manager"})
    lab.call("node.kill", node_id="tc-worker1")
    with pytest.raises(TransportError, match="down"):
        lab.call("node.call", node_id="tc-worker1", op="container.ps", params={})
    assert [n["status"] for n in lab.call("cluster.inspect", name="tc")["nodes"]] == ["ready", "down"]
    lab.call("cluster.remove", name="tc")
    assert lab.call("cluster.list") == [] and lab.call("node.list") == []
    assert "10.215" not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert not glob.glob("/sys/fs/cgroup/*/labkit/node-tc-*") and not os.path.exists("/sys/class/net/lkbr-cltc")


def test_cleanup_removes_a_cluster(lab):
    lab.call("cluster.create", spec=ClusterSpec(name="tcl", workers=1, subnet="10.209.10.0/24",
                                                tasks="10.216.0.0/16").to_dict())
    assert "cluster tcl" in lab.call("cleanup", dry_run=True)["facts"]["found"]
    from labkit.agent import cluster
    from labkit.agent.runner import Recorder
    cluster.cleanup(Recorder("cleanup"))
    assert lab.call("cluster.list") == [] and lab.call("node.list") == []


@pytest.mark.parametrize("bad", [{"name": "../x"}, {"name": "t", "workers": 99}, {"name": "t", "workers": -1},
                                 {"name": "t", "tasks": "10.209.0.0/16"}, {"name": "t", "tasks": "8.8.0.0/16"},
                                 {"name": "t", "subnet": "10.0.0.0/30"}, {"name": "t", "evil": 1}])
def test_bad_cluster_specs_are_refused(lab, bad):
    with pytest.raises(InvalidSpec):
        lab.call("cluster.create", spec=bad)
    with pytest.raises(NotFound):
        lab.call("cluster.remove", name="../../etc")


@pytest.fixture(params=["local", "vagrant"])
def any_cgroups(request):
    """This host (hybrid cgroups) and the lab VM (pure cgroup v2, over SSH as a student's laptop reaches it)."""
    if request.param == "local":
        lab = request.getfixturevalue("lab")
        yield lab
        return
    lab = request.getfixturevalue("vm_lab")
    try:
        yield lab
    finally:
        _remove_test_clusters(lab)


def test_a_service_heals_rolls_back_and_a_stack_resolves_on_hybrid_and_pure_v2_cgroups(any_cgroups):
    import time
    from labkit.wire.orchestration import ServiceSpec
    lab = any_cgroups
    mode = lab.cgroup_mode()["mode"]
    lab.call("cluster.create", spec=ClusterSpec(name="tv", workers=1, subnet="10.209.12.0/24",
                                                tasks="10.222.0.0/16").to_dict())
    web = ("sh", "-c", "mkdir -p /tmp/w && hostname > /tmp/w/index.html && exec httpd -f -p 80 -h /tmp/w")
    health = {"cmd": ["sh", "-c", "test ! -e /broken"], "interval": 0.3, "retries": 2}
    lab.call("service.create", name="tv", spec=ServiceSpec(name="web", image="busybox", replicas=2, cmd=web,
                                                           ports=("18496:80",), health=health).to_dict())

    def settle(want, seconds=120):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            lab.call("manager.step", name="tv")
            tasks = [t for t in lab.call("service.ps", name="tv") if t["desired"] == "running" and t["state"] == "running"]
            if sorted(t["node"] for t in tasks) == want:
                return tasks
            time.sleep(0.1)
        raise AssertionError(f"{mode}: not {want}: {lab.call('service.ps', name='tv')}")

    settle(["manager", "worker1"])
    lab.call("node.pause", node_id="tv-worker1")  # a hung machine: its cgroup frozen (v1 freezer / cgroup.freeze)
    assert lab.call("node.inspect", node_id="tv-worker1")["status"] == "paused", mode
    settle(["manager", "manager"])
    lab.call("node.resume", node_id="tv-worker1")
    lab.call("service.update", name="tv", service="web", replicas=3)
    settle(["manager", "manager", "worker1"])
    for _ in range(3):
        lab.call("manager.step", name="tv")
    rows = lab.call("node.call", node_id="tv-worker1", op="container.ps", params={"all": True})
    assert len(rows) == 1, f"{mode}: the thawed node's old container was removed, its new task runs: {rows}"
    got = lab.run(["python3", "-c", "import urllib.request as u; print(u.urlopen('http://127.0.0.1:18496/', "
                                    "timeout=5).read().decode())"])
    assert got.exit_code == 0 and got.stdout.strip(), f"{mode}: the published port answers: {got}"
    lab.call("node.kill", node_id="tv-worker1")
    settle(["manager", "manager", "manager"])

    lab.build("FROM busybox\nRUN touch /broken\n", "tv-web:broken")  # a new image that fails its health check
    try:
        lab.call("service.update", name="tv", service="web", image="tv-web:broken")
        end = time.monotonic() + 180
        while (lab.call("service.inspect", name="tv", service="web")["update"] or {}).get("state") != \
                "rollback_completed" and time.monotonic() < end:
            lab.call("manager.step", name="tv")
            time.sleep(0.1)
        info = lab.call("service.inspect", name="tv", service="web")
        assert info["update"]["state"] == "rollback_completed" and "unhealthy" in info["update"]["message"], (mode, info)
        assert {t["image"] for t in settle(["manager", "manager", "manager"])} == {"busybox:latest"}
        lab.call("service.rm", name="tv", service="web")
    finally:
        lab.call("manager.step", name="tv")
        lab.rmi("tv-web:broken", force=True)

    import yaml
    from labkit.wire.orchestration import StackSpec
    api = "mkdir -p /w && echo api > /w/index.html && exec httpd -f -p 80 -h /w"
    stack = StackSpec.from_compose("st", yaml.safe_load(
        "services:\n  api:\n    image: busybox\n    command: [sh, -c, '" + api + "']\n"
        "  front:\n    image: busybox\n    command: [sleep, '600']\n"))
    assert sorted(lab.call("stack.deploy", name="tv", spec=stack.to_dict())["created"]) == ["st_api", "st_front"]
    end = time.monotonic() + 120
    while len([t for t in lab.call("stack.ps", name="tv", stack="st") if t["state"] == "running"]) < 2:
        assert time.monotonic() < end, lab.call("stack.ps", name="tv", stack="st")
        lab.call("manager.step", name="tv")
        time.sleep(0.1)
    front = next(t for t in lab.call("stack.ps", name="tv", stack="st") if t["service"] == "st_front")
    got = lab.call("node.call", node_id="tv-manager", op="container.exec",
                   params={"ref": front["container"], "argv": ["wget", "-q", "-O-", "http://api/"]})
    assert got["exit_code"] == 0 and got["stdout"].strip() == "api", f"{mode}: a stack's name resolves: {got}"
    assert lab.call("stack.rm", name="tv", stack="st")["removed"] == ["st_api", "st_front"]
    lab.call("cluster.remove", name="tv")
    assert lab.call("cluster.list") == [] or all(c["name"] != "tv" for c in lab.call("cluster.list"))
