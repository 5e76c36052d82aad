"""labkit.agent.manager: a cluster's control loop: a replicated service, the routing mesh, a node's death healed."""
import http.client
import subprocess
import threading
import time

import pytest

from labkit.client.lab import Lab
from labkit.wire.errors import InvalidSpec, NotFound
from labkit.wire.orchestration import ServiceSpec, StackSpec
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


def _until(lab, running, seconds=20, step=True, service="web"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if step:
            lab.call("manager.step", name="tm")
        rows = [r for r in lab.call("service.ls", name="tm") if r["name"] == service]
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
    assert subprocess.run(["nft", "list", "table", "ip", "labkit_mesh_tm"], capture_output=True).returncode == 0
    lab.call("cluster.remove", name="tm")
    assert subprocess.run(["nft", "list", "table", "ip", "labkit_mesh_tm"], capture_output=True).returncode != 0
    lab.call("cluster.create", spec=ClusterSpec(name="tm", workers=0, subnet="10.209.11.0/24",
                                                tasks="10.217.0.0/16").to_dict())  # for the fixture to remove


def _running(lab, service="web"):
    return [t for t in lab.call("service.ps", name="tm", service=service)
            if t["desired"] == "running" and t["state"] == "running"]


def _update_state(lab, want, seconds=30, watch=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lab.call("manager.step", name="tm")
        if watch:
            watch()
        info = lab.call("service.inspect", name="tm", service="web")
        if (info["update"] or {}).get("state") == want:
            return info
        time.sleep(0.05)
    raise AssertionError(f"update not {want} within {seconds} s: {lab.call('service.inspect', name='tm', service='web')}"
                         f"\n{lab.call('service.ps', name='tm')}")


def test_a_rolling_update_goes_one_task_at_a_time_and_one_failing_its_health_check_is_rolled_back(lab):
    lab.call("image.tag", src="busybox", dst="tm-web:v2")
    lab.call("image.build", recipe="FROM busybox\nRUN touch /broken", ref="tm-web:v3")
    try:
        health = {"cmd": ["sh", "-c", "test ! -e /broken"], "interval": 0.2, "retries": 2}
        lab.call("service.create", name="tm", spec=ServiceSpec(name="web", image="busybox", replicas=3, cmd=WEB,
                                                               health=health).to_dict())
        _until(lab, 3)
        assert lab.call("service.inspect", name="tm", service="web")["update"] is None

        least = [3]
        lab.call("service.update", name="tm", service="web", image="tm-web:v2")
        info = _update_state(lab, "completed", watch=lambda: least.__setitem__(0, min(least[0], len(_running(lab)))))
        assert {t["image"] for t in _running(lab)} == {"tm-web:v2"} and len(_running(lab)) == 3
        assert least[0] == 2, f"one slot at a time (update_parallelism 1): at least 2 of 3 kept running, saw {least[0]}"
        assert info["previous"]["image"] == "busybox:latest"

        lab.call("service.update", name="tm", service="web", image="tm-web:v3")
        lab.call("service.update", name="tm", service="web", replicas=3)  # a scale during an update keeps it watched
        assert lab.call("service.inspect", name="tm", service="web")["update"]["state"] == "updating"
        info = _update_state(lab, "rollback_completed")
        assert info["spec"]["image"] == "tm-web:v2", "rolled back to the previous spec"
        assert "unhealthy" in info["update"]["message"], info["update"]
        assert {t["image"] for t in _running(lab)} == {"tm-web:v2"} and len(_running(lab)) == 3
        failed = [t for t in lab.call("service.ps", name="tm") if t["image"] == "tm-web:v3"]
        assert failed and all(t["desired"] == "shutdown" or t["state"] in ("failed", "shutdown") for t in failed)
        assert any("health checks failed" in (t["error"] or "") for t in failed), failed

        lab.call("service.update", name="tm", service="web", image="busybox")
        _update_state(lab, "completed")
        lab.call("service.rollback", name="tm", service="web")  # by hand: back to the previous spec, tm-web:v2
        _update_state(lab, "rollback_completed")
        assert {t["image"] for t in _running(lab)} == {"tm-web:v2"}
        lab.call("service.rm", name="tm", service="web")
        lab.call("manager.step", name="tm")
        for n in ("manager", "worker1", "worker2"):
            assert lab.call("node.call", node_id=f"tm-{n}", op="container.ps", params={"all": True}) == [], \
                "the containers of ended and removed tasks are gone"
    finally:
        lab.call("cluster.remove", name="tm")
        lab.call("cluster.create", spec=ClusterSpec(name="tm", workers=0, subnet="10.209.11.0/24",
                                                    tasks="10.217.0.0/16").to_dict())  # for the fixture
        for ref in ("tm-web:v2", "tm-web:v3"):
            lab.call("image.rmi", ref=ref, force=True)


def test_a_drained_node_gives_its_tasks_away_and_a_paused_one_takes_no_new_ones(lab):
    lab.call("service.create", name="tm", spec=ServiceSpec(name="web", image="busybox", replicas=3, cmd=WEB).to_dict())
    _until(lab, 3)
    lab.call("cluster.node_update", name="tm", node="worker1", availability="drain")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lab.call("manager.step", name="tm")
        nodes = sorted(t["node"] for t in _running(lab))
        if len(nodes) == 3 and "worker1" not in nodes:
            break
        time.sleep(0.05)
    assert sorted(t["node"] for t in _running(lab)) in (["manager", "manager", "worker2"],
                                                        ["manager", "worker2", "worker2"])
    assert [n["availability"] for n in lab.call("cluster.inspect", name="tm")["nodes"]] == ["active", "drain", "active"]
    lab.call("cluster.node_update", name="tm", node="worker1", availability="pause")
    lab.call("service.update", name="tm", service="web", replicas=5)
    _until(lab, 5)
    assert "worker1" not in {t["node"] for t in _running(lab)}, "a paused node takes no new task"
    with pytest.raises(InvalidSpec):
        lab.call("cluster.node_update", name="tm", node="worker1", availability="asleep")
    with pytest.raises(NotFound):
        lab.call("cluster.node_update", name="tm", node="worker9", availability="drain")


STACK = """
version: "3.8"
services:
  web:
    image: busybox
    command: ["sh", "-c", "mkdir -p /w && echo front > /w/index.html && exec httpd -f -p 80 -h /w"]
    ports: ["18482:80"]
  api:
    image: busybox
    command: ["sh", "-c", "mkdir -p /w && hostname > /w/index.html && exec httpd -f -p 80 -h /w"]
    deploy:
      replicas: 2
"""


def test_a_stack_resolves_its_services_by_name_and_goes_with_stack_rm(lab):
    import yaml
    spec = StackSpec.from_compose("demo", yaml.safe_load(STACK))
    made = lab.call("stack.deploy", name="tm", spec=spec.to_dict())
    assert sorted(made["created"]) == ["demo_api", "demo_web"] and made["updated"] == []
    _until(lab, 1, service="demo_web")
    _until(lab, 2, service="demo_api")
    assert lab.call("stack.ls", name="tm") == [{"name": "demo", "services": 2}]
    assert "tm" in [c["name"] for c in lab.call("cluster.list")]  # (and it leaves the records beside be)
    assert {t["service"] for t in lab.call("stack.ps", name="tm", stack="demo")} == {"demo_api", "demo_web"}
    web = _running(lab, "demo_web")[0]
    api_hosts = {t["container"] for t in _running(lab, "demo_api")}
    seen = set()
    for _ in range(6):  # by its name in the stack file and by its full name, balanced over both tasks
        for host in ("api", "demo_api"):
            res = lab.call("node.call", node_id=f"tm-{web['node']}", op="container.exec",
                           params={"ref": web["container"], "argv": ["wget", "-q", "-O-", f"http://{host}/"]})
            assert res["exit_code"] == 0, res
            seen.add(res["stdout"].strip())
    assert len(seen) == 2, f"the service's virtual address balances over its 2 tasks: {seen} ({api_hosts})"
    assert _get(port=18482) == "front"
    again = lab.call("stack.deploy", name="tm", spec=spec.to_dict())
    assert again["created"] == [] and again["updated"] == [], "deploying the same file again changes nothing"
    with pytest.raises(InvalidSpec):
        lab.call("service.create", name="tm", spec=ServiceSpec(name="demo_api", image="busybox").to_dict())
    gone = lab.call("stack.rm", name="tm", stack="demo")
    assert gone["removed"] == ["demo_api", "demo_web"]
    assert lab.call("stack.ls", name="tm") == [] and lab.call("service.ls", name="tm") == []
    lab.call("manager.step", name="tm")
    for n in ("manager", "worker1", "worker2"):
        assert lab.call("node.call", node_id=f"tm-{n}", op="container.ps", params={"all": True}) == []
    with pytest.raises(NotFound):
        lab.call("stack.rm", name="tm", stack="demo")


def test_a_control_loop_of_ones_own_drives_the_cluster_through_observe_and_act(lab):
    """Lab 09's student loop: observe, one's own reconcile (here the library's, client-side), act."""
    import secrets
    from labkit.wire.orchestration import Action, Node, Task, reconcile
    made = lab.call("service.create", name="tm", spec=ServiceSpec(name="web", image="busybox", replicas=2,
                                                                 cmd=WEB).to_dict(), step=False)
    assert made == {"service": "web", "vip": "10.217.255.1"}
    obs = lab.call("manager.observe", name="tm")
    assert [n["name"] for n in obs["nodes"]] == ["manager", "worker1", "worker2"] and obs["tasks"] == []
    services = {k: ServiceSpec.from_dict(v) for k, v in obs["services"].items()}
    nodes = [Node.from_dict(n) for n in obs["nodes"]]
    tasks = [Task.from_dict(t) for t in obs["tasks"]]
    actions = reconcile(services, nodes, tasks, obs["now"], lambda: secrets.token_hex(5))
    assert [a.kind for a in actions] == ["start", "start"]
    with pytest.raises(InvalidSpec, match="not a new task"):
        forged = Action("start", Task("t1", "web", 1, "manager", "busybox", "running", "assigned"), "manager")
        lab.call("manager.act", name="tm", actions=[forged.to_dict()])
    with pytest.raises(NotFound):
        gone = Action("stop", Task("0123456789", "web", 1, "manager", "busybox", "shutdown", "running"))
        lab.call("manager.act", name="tm", actions=[gone.to_dict()])
    lab.call("manager.act", name="tm", actions=[a.to_dict() for a in actions])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len([t for t in lab.call("manager.observe", name="tm")["tasks"]
                                                if t["state"] == "running" and t["desired"] == "running"]) < 2:
        time.sleep(0.05)
    running = _running(lab)
    assert sorted(t["node"] for t in running) == ["manager", "worker1"], "spread, first names first"


def test_forged_actions_corrupt_records_and_clashing_services_are_refused_and_the_loop_goes_on(lab):
    """The attacks an attacker's review found, each refused: a client's act() that reuses a running task's id,
    names a task twice, takes a held slot or one above replicas, or marks a task running; records edited to
    garbage (a newline in an address would have been an nft command); a name too long for its containers; a
    second service on a published port; a stack taking over a service of its own name; a removed service's
    virtual address handed to the next one."""
    import json
    import secrets
    from labkit.agent import cluster
    from labkit.wire.orchestration import Action, Task
    lab.call("service.create", name="tm", spec=ServiceSpec(name="web", image="busybox", replicas=2, cmd=WEB,
                                                           ports=("18483:80",)).to_dict())
    _until(lab, 2)
    running = _running(lab)
    reuse = Task(running[0]["id"], "web", 2, "worker2", "busybox", "running", "assigned")
    free = lambda slot: Task(secrets.token_hex(5), "web", slot, "worker2", "busybox", "running", "assigned")  # noqa
    for bad in ([Action("start", reuse, "worker2")], [Action("start", free(3), "worker2")],
                [Action("start", free(1), "worker2")]):
        with pytest.raises(InvalidSpec, match="not a new task in a free slot"):
            lab.call("manager.act", name="tm", actions=[a.to_dict() for a in bad])
    twice = Task(running[0]["id"], "web", running[0]["slot"], running[0]["node"], "busybox", "shutdown", "running")
    with pytest.raises(InvalidSpec, match="two actions"):
        lab.call("manager.act", name="tm", actions=[Action("stop", twice).to_dict()] * 2)
    mark = Action("mark", dict(twice.to_dict(), state="orphaned"))
    lab.call("manager.act", name="tm", actions=[dict(mark.to_dict(), task=dict(twice.to_dict(), state="running"))])
    marked = next(t for t in lab.call("service.ps", name="tm") if t["id"] == running[0]["id"])
    assert (marked["desired"], marked["state"]) == ("shutdown", "orphaned"), "a mark orphans, whatever it says"
    _until(lab, 2)

    with pytest.raises(InvalidSpec, match="longer than 48"):
        ServiceSpec(name="s" * 49, image="busybox")
    with pytest.raises(InvalidSpec, match="published by service web"):
        lab.call("service.create", name="tm", spec=ServiceSpec(name="other", image="busybox",
                                                               ports=("18483:80",)).to_dict())
    vip = lab.call("service.inspect", name="tm", service="web")["vip"]
    lab.call("service.create", name="tm", spec=ServiceSpec(name="demo_db", image="busybox", replicas=0).to_dict())
    db_vip = lab.call("service.inspect", name="tm", service="demo_db")["vip"]
    lab.call("service.rm", name="tm", service="demo_db")
    lab.call("service.create", name="tm", spec=ServiceSpec(name="late", image="busybox", replicas=0).to_dict())
    assert lab.call("service.inspect", name="tm", service="late")["vip"] not in (vip, db_vip)
    lab.call("service.create", name="tm", spec=ServiceSpec(name="demo_db", image="busybox", replicas=0).to_dict())
    stack = StackSpec("demo", (ServiceSpec("demo_db", "busybox", networks=("demo_default",)),), ("demo_default",))
    with pytest.raises(InvalidSpec, match="exists outside stack demo"):
        lab.call("stack.deploy", name="tm", spec=stack.to_dict())
    lab.call("service.rm", name="tm", service="demo_db")
    lab.call("stack.deploy", name="tm", spec=stack.to_dict())
    changed = StackSpec("demo", (ServiceSpec("demo_db", "busybox", cmd=("true",), networks=("demo_default",)),),
                        ("demo_default",))
    with pytest.raises(InvalidSpec, match="not a new cmd"):
        lab.call("stack.deploy", name="tm", spec=changed.to_dict())
    clash = StackSpec("demo", (ServiceSpec("demo_db", "busybox", ports=("18483:80",), networks=("demo_default",)),),
                      ("demo_default",))
    with pytest.raises(InvalidSpec, match="published by service web"):
        lab.call("stack.deploy", name="tm", spec=clash.to_dict())

    garbage = {"updates.json": {"web": "x", "late": {"state": "melting"}}, "health.json": {"t": [1]},
               "stacks.json": {"demo": "x"},
               "vips.json": {"next": "x", "vips": {"web": "10.217.255.9\nflush ruleset", "late": [1]}},
               "services.json": {"alias": {"name": "web", "image": "busybox", "replicas": 2, "cmd": list(WEB),
                                           "ports": ["18483:80"]}}}
    for part, value in garbage.items():
        with open(cluster.file("tm", part), "w") as f:
            json.dump(value, f)
    _until(lab, 2)
    rules = subprocess.run(["nft", "list", "table", "ip", "labkit_mesh_tm"], capture_output=True, text=True).stdout
    assert "flush" not in rules and "dport 18483" in rules
    assert _get(port=18483)
