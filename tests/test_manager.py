"""labkit.agent.manager: a cluster's control loop: a replicated service, the routing mesh, a node's death healed."""
import http.client
import subprocess
import threading
import time

import pytest

from labkit.client.lab import Lab
from labkit.wire.errors import InvalidSpec, NotFound
from labkit.wire.orchestration import ServiceSpec
from labkit.wire.specs import ClusterSpec

pytestmark = pytest.mark.privileged

PORT = 18480
WEB = ("sh", "-c", "mkdir -p /tmp/w && hostname > /tmp/w/index.html && exec httpd -f -p 80 -h /tmp/w")


@pytest.fixture
def lab():
    from labkit.agent.local import InProcess
    lab = Lab(InProcess(), target="local")
    lab.call("cluster.create", spec=ClusterSpec(name="tm", workers=2, subnet="10.209.11.0/24",
                                                tasks="10.217.0.0/16").to_dict())
    try:
        yield lab
    finally:
        lab.call("cluster.remove", name="tm")
        lab.close()


def _get(host="127.0.0.1", port=PORT, timeout=1.0):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode().strip()
    finally:
        conn.close()


def _until(lab, running, seconds=20, step=True):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if step:
            lab.call("manager.step", name="tm")
        rows = lab.call("service.ls", name="tm")
        if rows and rows[0]["running"] == running:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"not {running} running within {seconds} s: {lab.call('service.ps', name='tm')}")


def test_a_service_spreads_answers_on_every_node_and_heals_when_a_node_dies(lab):
    lab.call("service.create", name="tm", spec=ServiceSpec(name="web", image="busybox", replicas=3, cmd=WEB,
                                                           ports=("18480:80",)).to_dict())
    _until(lab, 3)
    tasks = [t for t in lab.call("service.ps", name="tm") if t["state"] == "running"]
    assert sorted(t["node"] for t in tasks) == ["manager", "worker1", "worker2"], "spread: one task per node"
    seen = {_get() for _ in range(12)}
    assert len(seen) == 3, f"round-robin over the three tasks from 127.0.0.1: {seen}"
    for ip in ("10.209.11.10", "10.209.11.11", "10.209.11.12"):
        assert _get(ip) in seen, f"the published port answers on node {ip} too (the routing mesh)"

    lab.call("cluster.manage", name="tm")  # the loop, as a process of its own, from here on
    failures, total, stop = [], [0], threading.Event()

    def load():
        while not stop.is_set():
            total[0] += 1
            try:
                _get(timeout=0.5)
            except OSError as exc:
                failures.append(repr(exc))
            time.sleep(0.01)
    t = threading.Thread(target=load, daemon=True)
    t.start()
    time.sleep(0.5)
    killed = time.monotonic()
    lab.call("node.kill", node_id="tm-worker1")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        running = [t["node"] for t in lab.call("service.ps", name="tm")
                   if t["desired"] == "running" and t["state"] == "running"]
        if len(running) == 3 and "worker1" not in running:
            break
        time.sleep(0.02)
    healed = time.monotonic() - killed
    time.sleep(0.5)
    stop.set()
    t.join(5)
    tasks = [t for t in lab.call("service.ps", name="tm") if t["desired"] == "running" and t["state"] == "running"]
    assert sorted(t["node"] for t in tasks) in (["manager", "manager", "worker2"], ["manager", "worker2", "worker2"])
    assert any(t["state"] == "orphaned" and t["node"] == "worker1" for t in lab.call("service.ps", name="tm"))
    print(f"healed in {healed:.2f} s; {len(failures)} of {total[0]} requests failed")
    assert healed < 10, "the lost task came back on another node"
    assert len(failures) < total[0] / 4, f"the port kept answering: {failures[:5]}"
    lab.call("cluster.unmanage", name="tm")

    lab.call("service.update", name="tm", service="web", replicas=1)
    _until(lab, 1)
    lab.call("service.rm", name="tm", service="web")
    assert lab.call("service.ls", name="tm") == []
    with pytest.raises(NotFound):
        lab.call("service.rm", name="tm", service="web")
    with pytest.raises(InvalidSpec):
        lab.call("service.create", name="tm", spec={"name": "../x", "image": "busybox"})


def test_cluster_remove_takes_the_mesh_with_it(lab):
    lab.call("service.create", name="tm", spec=ServiceSpec(name="web", image="busybox", replicas=1, cmd=WEB,
                                                           ports=("18481:80",)).to_dict())
    _until(lab, 1)
    assert _get(port=18481)
    assert subprocess.run(["nft", "list", "table", "ip", "labkit_mesh"], capture_output=True).returncode == 0
    lab.call("cluster.remove", name="tm")
    assert subprocess.run(["nft", "list", "table", "ip", "labkit_mesh"], capture_output=True).returncode != 0
    lab.call("cluster.create", spec=ClusterSpec(name="tm", workers=0, subnet="10.209.11.0/24",
                                                tasks="10.217.0.0/16").to_dict())  # for the fixture to remove
