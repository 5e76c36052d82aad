"""Orchestration is pure: the scheduler, the control loop and stack files, without a kernel or a clock."""
import ast
import copy
import dataclasses
import json

import pytest
import yaml

from labkit.wire import orchestration
from labkit.wire.errors import InvalidSpec
from labkit.wire.orchestration import (Action, HealthCheck, Node, Publish, ServiceSpec, StackSpec, Task, reconcile,
                                       schedule, update_failed)


class Ids:
    """new_id for reconcile: t1, t2, ..."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1
        return f"t{self.n}"


def nodes(*specs):
    """Nodes from "name" or "name:availability:status"."""
    out = []
    for spec in specs:
        name, availability, status = (spec.split(":") + ["active", "ready"][spec.count(":"):])[:3]
        out.append(Node(name, "manager" if name == "m1" else "worker", availability, status))
    return out


def step(services, cluster, tasks, now, ids):
    """One reconcile step, its actions applied as the caller stores them: (tasks, actions)."""
    actions = reconcile({s.name: s for s in services}, cluster, tasks, now, ids)
    table = {t.id: t for t in tasks}
    for a in actions:
        table[a.task.id] = a.task
    return list(table.values()), actions


def run(tasks, now):
    """The agents' side: assigned tasks start running, stopped ones shut down."""
    out = []
    for t in tasks:
        if t.desired == "running" and t.state in ("assigned", "starting"):
            t = dataclasses.replace(t, state="running", since=now)
        elif t.desired == "shutdown" and t.state in orchestration.LIVE_STATES:
            t = dataclasses.replace(t, state="shutdown", since=now)
        out.append(t)
    return out


def live(tasks, service=None):
    return sorted((t for t in tasks if t.live and service in (None, t.service)), key=lambda t: t.slot)


def per_node(tasks):
    counts = {}
    for t in live(tasks):
        counts[t.node] = counts.get(t.node, 0) + 1
    return counts


def kinds(actions):
    return [(a.kind, a.task.slot) for a in actions]


WEB = ServiceSpec("demo_web", "busybox", replicas=6)


def test_spread_over_three_nodes():
    tasks, actions = step([WEB], nodes("n1", "n2", "n3"), [], 0.0, Ids())
    assert kinds(actions) == [("start", s) for s in range(1, 7)]
    assert [a.node for a in actions] == ["n1", "n2", "n3", "n1", "n2", "n3"]
    assert all(a.task.state == "assigned" and a.task.node == a.node and a.task.image == "busybox:latest"
               for a in actions)
    assert per_node(tasks) == {"n1": 2, "n2": 2, "n3": 2}
    again, actions = step([WEB], nodes("n1", "n2", "n3"), run(tasks, 1.0), 1.0, Ids())
    assert actions == []


def test_spread_breaks_ties_by_all_tasks_then_name():
    other = Task("x1", "demo_db", 1, "n1", "busybox", "running", "running")
    assert schedule(WEB, 1, nodes("n2", "n1", "n3"), [other]) == "n2"
    assert schedule("demo_db", 2, nodes("n2", "n1", "n3"), [other]) == "n2"
    assert schedule(WEB, 1, nodes("n1:pause", "n2:drain", "n3:active:down"), []) is None


def test_a_drained_manager_gets_nothing():
    cluster = nodes("m1:drain", "w1", "w2")
    tasks, _ = step([WEB], cluster, [], 0.0, Ids())
    assert per_node(tasks) == {"w1": 3, "w2": 3}


def test_draining_a_node_moves_its_tasks():
    ids = Ids()
    tasks, _ = step([WEB], nodes("n1", "n2", "n3"), [], 0.0, ids)
    tasks, actions = step([WEB], nodes("n1", "n2:drain", "n3"), run(tasks, 1.0), 2.0, ids)
    assert [(a.kind, a.task.node, a.reason) for a in actions[:2]] == [("stop", "n2", "node n2 is drained")] * 2
    assert [(a.kind, a.node) for a in actions[2:]] == [("start", "n1"), ("start", "n3")]
    assert per_node(tasks) == {"n1": 3, "n3": 3}


def test_node_down_orphans_its_tasks_and_they_come_back_elsewhere_in_one_step():
    ids = Ids()
    tasks, _ = step([WEB], nodes("n1", "n2", "n3"), [], 0.0, ids)
    tasks = run(tasks, 1.0)
    tasks, actions = step([WEB], nodes("n1", "n2:active:down", "n3"), tasks, 5.0, ids)
    marks = [a for a in actions if a.kind == "mark"]
    assert [(a.task.slot, a.task.state, a.task.desired, a.reason) for a in marks] == \
        [(2, "orphaned", "shutdown", "node n2 is down"), (5, "orphaned", "shutdown", "node n2 is down")]
    starts = [a for a in actions if a.kind == "start"]
    assert [(a.task.slot, a.node, a.reason) for a in starts] == \
        [(2, "n1", "slot 2: replaces t2"), (5, "n3", "slot 5: replaces t5")]
    assert len(live(tasks)) == WEB.replicas and per_node(tasks) == {"n1": 3, "n3": 3}
    tasks, actions = step([WEB], nodes("n1", "n3"), run(tasks, 6.0), 6.0, ids)  # n2 gone for good
    assert actions == []


def test_a_task_on_an_unknown_node_is_orphaned():
    t = Task("t9", "demo_web", 1, "ghost", "busybox", "running", "running")
    _, actions = step([ServiceSpec("demo_web", "busybox")], nodes("n1"), [t], 1.0, Ids())
    assert [(a.kind, a.task.id, a.task.state, a.reason) for a in actions] == \
        [("mark", "t9", "orphaned", "node ghost is not in the cluster"),
         ("start", "t1", "assigned", "slot 1: replaces t9")]


def test_scale_up_then_down_highest_slots_first():
    ids, cluster = Ids(), nodes("n1", "n2")
    tasks, _ = step([ServiceSpec("demo_web", "busybox", replicas=2)], cluster, [], 0.0, ids)
    tasks, actions = step([ServiceSpec("demo_web", "busybox", replicas=5)], cluster, run(tasks, 1.0), 1.0, ids)
    assert kinds(actions) == [("start", 3), ("start", 4), ("start", 5)]
    tasks, actions = step([ServiceSpec("demo_web", "busybox", replicas=2)], cluster, run(tasks, 2.0), 2.0, ids)
    assert kinds(actions) == [("stop", 5), ("stop", 4), ("stop", 3)]
    assert all(a.task.desired == "shutdown" and a.reason == "scaled down to 2 replicas" for a in actions)
    assert [t.slot for t in live(tasks)] == [1, 2]
    tasks, actions = step([ServiceSpec("demo_web", "busybox", replicas=0)], cluster, run(tasks, 3.0), 3.0, ids)
    assert kinds(actions) == [("stop", 2), ("stop", 1)] and live(tasks) == []


def test_an_ended_task_is_replaced_whatever_its_end():
    svc = ServiceSpec("demo_job", "busybox", replicas=3)
    ended = [Task(f"e{s}", svc.name, s, "n1", "busybox", "running", state, since=1.0)
             for s, state in ((1, "complete"), (2, "failed"), (3, "rejected"))]
    _, actions = step([svc], nodes("n1"), ended, 2.0, Ids())
    assert kinds(actions) == [("start", 1), ("start", 2), ("start", 3)]


def test_a_crash_loop_backs_off():
    svc, ids = ServiceSpec("demo_crash", "busybox"), Ids()
    tasks = []
    for i in range(5):
        tasks, actions = step([svc], nodes("n1"), tasks, float(i), ids)
        assert kinds(actions) == [("start", 1)]
        tasks = [dataclasses.replace(t, state="failed", since=i + 0.5) if t.live else t for t in tasks]
    assert step([svc], nodes("n1"), tasks, 6.0, ids)[1] == []     # 5 failures in 4 s: wait
    assert step([svc], nodes("n1"), tasks, 10.4, ids)[1] == []    # the first failure (0.5) is 9.9 s old
    assert kinds(step([svc], nodes("n1"), tasks, 10.5, ids)[1]) == [("start", 1)]
    tasks[0] = dataclasses.replace(tasks[0], state="complete")     # one of the five did not fail
    assert kinds(step([svc], nodes("n1"), tasks, 6.0, ids)[1]) == [("start", 1)]


def test_no_eligible_node_leaves_the_service_under_replicated():
    ids = Ids()
    tasks, actions = step([WEB], nodes("n1:pause", "n2:active:down"), [], 0.0, ids)
    assert actions == []
    tasks, actions = step([WEB], nodes("n1:pause", "n2"), tasks, 1.0, ids)
    assert [a.node for a in actions] == ["n2"] * 6


def test_a_task_without_a_node_is_assigned_one():
    pending = Task("p1", "demo_web", 1, None, "busybox", "running", "new")
    _, actions = step([ServiceSpec("demo_web", "busybox")], nodes("n1"), [pending], 1.0, Ids())
    assert [(a.kind, a.task.id, a.node, a.task.state) for a in actions] == [("start", "p1", "n1", "assigned")]


def test_a_second_live_task_in_a_slot_is_stopped():
    a = Task("a", "demo_web", 1, "n1", "busybox", "running", "running", since=1.0)
    b = Task("b", "demo_web", 1, "n1", "busybox", "running", "starting", since=2.0)
    _, actions = step([ServiceSpec("demo_web", "busybox")], nodes("n1"), [a, b], 3.0, Ids())
    assert [(x.kind, x.task.id, x.reason) for x in actions] == [("stop", "b", "slot 1 already has task a")]


def test_a_removed_services_tasks_are_stopped():
    ids, cluster = Ids(), nodes("n1", "n2")
    db = ServiceSpec("demo_db", "busybox", replicas=2)
    tasks, _ = step([WEB, db], cluster, [], 0.0, ids)
    tasks, actions = step([WEB], cluster, run(tasks, 1.0), 2.0, ids)
    assert [(a.kind, a.task.service, a.task.slot, a.reason) for a in actions] == \
        [("stop", "demo_db", 2, "service demo_db was removed"), ("stop", "demo_db", 1, "service demo_db was removed")]
    assert live(tasks, "demo_db") == [] and len(live(tasks, "demo_web")) == 6


def rolled_out(replicas=3, parallelism=1, delay=0.0):
    ids, cluster = Ids(), nodes("n1", "n2", "n3")
    v1 = ServiceSpec("demo_web", "course/web:v1", replicas=replicas)
    tasks, _ = step([v1], cluster, [], 0.0, ids)
    v2 = dataclasses.replace(v1, image="course/web:v2", update_parallelism=parallelism, update_delay=delay)
    return ids, cluster, v2, run(tasks, 1.0)


def test_a_rolling_update_replaces_one_slot_at_a_time():
    ids, cluster, v2, tasks = rolled_out()
    now, order = 10.0, []
    for _ in range(3):
        tasks, actions = step([v2], cluster, tasks, now, ids)
        assert [(a.kind, a.task.image) for a in actions] == [("stop", "course/web:v1"), ("start", "course/web:v2")]
        assert actions[0].task.slot == actions[1].task.slot and actions[0].reason == "update to course/web:v2"
        order.append(actions[1].task.slot)
        assert step([v2], cluster, tasks, now + 1, ids)[1] == []   # the new task is not running yet
        tasks = run(tasks, now + 2)
        now += 3
    assert order == [1, 2, 3]
    assert {t.image for t in live(tasks)} == {"course/web:v2"} and len(live(tasks)) == 3
    assert step([v2], cluster, tasks, now, ids)[1] == []


def test_a_rolling_update_in_pairs_and_with_a_delay():
    ids, cluster, v2, tasks = rolled_out(replicas=3, parallelism=2, delay=5.0)
    tasks, actions = step([v2], cluster, tasks, 10.0, ids)
    assert kinds(actions) == [("stop", 1), ("start", 1), ("stop", 2), ("start", 2)]
    tasks = run(tasks, 11.0)
    assert step([v2], cluster, tasks, 15.9, ids)[1] == []           # 5 s after the new tasks began running
    assert kinds(step([v2], cluster, tasks, 16.0, ids)[1]) == [("stop", 3), ("start", 3)]


def test_no_update_while_another_slot_has_no_running_task():
    ids, cluster, v2, tasks = rolled_out()
    slot3 = next(t for t in tasks if t.slot == 3)
    tasks = [dataclasses.replace(t, state="failed", since=9.0) if t is slot3 else t for t in tasks]
    tasks, actions = step([v2], cluster, tasks, 10.0, ids)
    assert [(a.kind, a.task.slot, a.task.image) for a in actions] == [("start", 3, "course/web:v2")]
    assert step([v2], cluster, tasks, 11.0, ids)[1] == []            # slot 3's new task is only assigned
    tasks = [dataclasses.replace(t, state="starting") if t.live and t.slot == 2 else t for t in run(tasks, 12.0)]
    assert step([v2], cluster, tasks, 13.0, ids)[1] == []            # slot 2 is starting
    assert kinds(step([v2], cluster, run(tasks, 14.0), 14.0, ids)[1]) == [("stop", 1), ("start", 1)]


def test_update_failed_sees_a_new_task_fail_during_the_update():
    ids, cluster, v2, tasks = rolled_out()
    tasks, actions = step([v2], cluster, tasks, 10.0, ids)
    new = actions[1].task
    assert not update_failed(v2, tasks, 10.5)
    tasks = [dataclasses.replace(t, state="failed", since=12.0) if t.id == new.id else t for t in tasks]
    assert update_failed(v2, tasks, 12.5)
    assert not update_failed(v2, tasks, 12.0 + orchestration.UPDATE_MONITOR + 1)  # an old failure
    v1 = dataclasses.replace(v2, image="course/web:v1")
    assert not update_failed(v1, tasks, 12.5)                         # v1 tasks did not fail
    rollback = step([v1], cluster, tasks, 13.0, ids)[1]
    assert [(a.kind, a.task.image) for a in rollback] == [("start", "course/web:v1")]


def test_update_failed_on_the_last_batch_and_after_the_health_window():
    ids, cluster, v2, tasks = rolled_out(replicas=1)
    v2 = dataclasses.replace(v2, health=HealthCheck(("true",), interval=10, retries=3, start_period=5))
    assert v2.health.window == 45.0
    tasks, actions = step([v2], cluster, tasks, 10.0, ids)       # the only slot: no old task left live
    tasks = [dataclasses.replace(t, state="failed", since=50.0) if t.id == actions[1].task.id else t for t in tasks]
    assert update_failed(v2, tasks, 50.0)                            # the old task was stopped 40 s ago
    assert not update_failed(v2, tasks, 60.0)
    assert not update_failed(ServiceSpec("demo_web", "course/web:v2"), tasks, 50.0)  # window 10 s


LECTURE = """
version: "3.8"
services:
  web:
    image: course/web:v1
    command: httpd -f -p 80 -h "/srv/www"
    ports:
      - "8080:80"
    networks: [front]
    deploy:
      replicas: 2
      update_config:
        parallelism: 1
        delay: 1m30s
        failure_action: rollback
    healthcheck:
      test: ["CMD", "wget", "-q", "-O-", "http://localhost/"]
      interval: 500ms
      retries: 3
      start_period: 2s
      timeout: 5s
  api:
    image: course/api:v1
    environment:
      CACHE: cache:6379
      WORKERS: 4
    networks: [front, back]
    healthcheck:
      test: wget -q -O- http://localhost:5000/health
  cache:
    image: redis:7-alpine
    command: ["redis-server", "--save", ""]
    environment: ["MAXMEMORY=64mb"]
    networks:
      - back
networks:
  front:
    driver: overlay
  back: {}
"""


def lecture():
    return yaml.safe_load(LECTURE)


def test_the_lectures_stack_file():
    stack = StackSpec.from_compose("demo", lecture())
    assert stack.name == "demo" and stack.networks == ("demo_front", "demo_back")
    web, api, cache = stack.services
    assert web == ServiceSpec(
        "demo_web", "course/web:v1", replicas=2, cmd=("httpd", "-f", "-p", "80", "-h", "/srv/www"),
        ports=(Publish(8080, 80),), networks=("demo_front",),
        health=HealthCheck(("wget", "-q", "-O-", "http://localhost/"), interval=0.5, retries=3, start_period=2.0,
                           timeout=5.0),
        update_parallelism=1, update_delay=90.0, update_failure_action="rollback")
    assert api == ServiceSpec("demo_api", "course/api:v1", env=(("CACHE", "cache:6379"), ("WORKERS", "4")),
                              networks=("demo_front", "demo_back"),
                              health=HealthCheck(("sh", "-c", "wget -q -O- http://localhost:5000/health")))
    assert cache == ServiceSpec("demo_cache", "redis:7-alpine", cmd=("redis-server", "--save", ""),
                                env=(("MAXMEMORY", "64mb"),), networks=("demo_back",))


def test_a_service_without_networks_joins_the_stacks_default_network():
    data = {"services": {"web": {"image": "busybox", "ports": [{"target": 80, "published": 8080, "mode": "ingress"}],
                                 "healthcheck": {"test": ["CMD-SHELL", "wget -q -O- localhost || exit 1"]}},
                         "api": {"image": "busybox", "networks": ["back"]}},
            "networks": {"back": None, "unused": {"driver": "bridge"}}}
    stack = StackSpec.from_compose("shop", data)
    assert stack.networks == ("shop_back", "shop_default")
    assert stack.services[0].networks == ("shop_default",) and stack.services[0].ports == (Publish(8080, 80, "tcp"),)
    assert stack.services[0].health.cmd == ("sh", "-c", "wget -q -O- localhost || exit 1")


def mutate(path, value):
    """The lecture's file with ``value`` at ``path`` (keys separated by '/', or a tuple of keys); value DELETE
    removes the key."""
    data = lecture()
    *parents, last = path.split("/") if isinstance(path, str) else path
    here = data
    for key in parents:
        here = here[key]
    if value is DELETE:
        del here[last]
    else:
        here[last] = value
    return data


DELETE = object()
BIG = "x" * (1 << 20)


@pytest.mark.parametrize("path, value, message", [
    # keys Compose has that labkit does not do, at every level
    ("volumes", {"data": None}, "volumes: labkit's stacks do not do named volumes"),
    ("x-common", {"image": "busybox"}, "x-common: labkit's stacks do not do extension fields"),
    ("services/web/privileged", True, "services.web.privileged: labkit's stacks do not do privileged containers"),
    ("services/web/volumes", ["/:/host"], "services.web.volumes: labkit's stacks do not do volumes"),
    ("services/web/build", ".", "services.web.build: labkit's stacks do not do builds"),
    ("services/web/deploy/placement", {"constraints": ["node.role == manager"]},
     "services.web.deploy.placement: labkit's stacks do not do placement constraints"),
    ("services/web/deploy/resources", {"limits": {"memory": "1G"}}, "deploy.resources: labkit's stacks do not do"),
    ("services/web/deploy/mode", "global", "services.web.deploy.mode: labkit's stacks do not do 'global'"),
    ("services/web/deploy/update_config/order", "start-first", "update_config.order: labkit's stacks do not do"),
    ("services/web/healthcheck/timeout", "2m", "healthcheck.timeout=120 s is out of range (0.1..60 s)"),
    ("services/web/healthcheck/test", ["NONE"], "do not do disabling health checks"),
    ("networks/front/external", True, "networks.front.external: labkit's stacks do not do external networks"),
    ("networks/front/driver", "macvlan", "networks.front.driver: 'macvlan' is not a driver"),
    ("services/web/ports", [{"target": 80, "published": 8080, "mode": "host"}], "host-mode ports"),
    # keys Compose does not have
    ("servces", {}, "servces: Compose file format 3 has no such key"),
    ("services/web/imag", "busybox", "services.web.imag: Compose file format 3 has no such key"),
    ("services/web/deploy/replica", 2, "services.web.deploy.replica: Compose file format 3 has no such key"),
    ("services/web/deploy/update_config/paralelism", 2, "update_config.paralelism: Compose file format 3 has no"),
    ("services/web/healthcheck/intervall", "1s", "healthcheck.intervall: Compose file format 3 has no such key"),
    ("networks/back", {"drive": "overlay"}, "networks.back.drive: Compose file format 3 has no such key"),
    ("services/web/ports", [{"target": 80, "published": 8080, "host_ip": "0.0.0.0"}], "ports[0].host_ip: Compose"),
    # sizes and values that would hurt
    ("services/web/deploy/replicas", 10_000, "services.web.deploy.replicas=10000 is out of range (0..100)"),
    ("services/web/deploy/replicas", -1, "replicas=-1 is out of range"),
    ("services/web/deploy/replicas", BIG, "replicas='xxxxx"),
    ("services/web/command", BIG, "services.web.command is 1048576 characters long (at most 4096)"),
    ("services/web/command", ["sh", "-c", BIG], "services.web.command[2] is 1048576 characters long"),
    ("services/web/image", BIG, "services.web.image is 1048576 characters long"),
    ("services/api/environment", {"K": BIG}, "services.api.environment.K is 1048576 characters long"),
    ("services/api/environment", ["K"], "has no value"),
    ("services/web/command", ["sleep", "\0"], "services.web.command[1] holds a NUL byte"),
    ("services/web/networks", ["front", "../x"], "services.web.networks[1]: network name '../x' is not allowed"),
    ("services/web/command", "echo 'unclosed", "No closing quotation"),
    ("services/web/command", [], "services.web.command is empty"),
    (("services", "../etc"), {"image": "busybox"}, "services: service name '../etc' is not allowed"),
    (("services", "a/b"), {"image": "busybox"}, "services: service name 'a/b' is not allowed"),
    ("services/" + "w" * 70, {"image": "busybox"}, "is longer than 63 characters"),
    ("services/" + "w" * 60, {"image": "busybox"}, "services.wwww"),
    (("networks", "a..b"), None, "networks: network name 'a..b' is not allowed"),
    ("services/web/image", "../../etc/passwd", "services.web: image name '../../etc/passwd' is not allowed"),
    ("services/web/ports", ["0:80"], "services.web.ports[0]: published port=0 is out of range (1..65535)"),
    ("services/web/ports", ["8080:70000"], "target port=70000 is out of range (1..65535)"),
    ("services/web/ports", [{"target": 80, "published": 70000}], "published port=70000 is out of range"),
    ("services/web/ports", ["8080:80", "8080:81"], "published port 8080/tcp is published twice"),
    ("services/api/ports", ["8080:5000"], "services 'demo_web' and 'demo_api' both publish port 8080/tcp"),
    ("services/web/ports", [1342], "quote the mapping"),
    ("services/web/ports", ["127.0.0.1:8080:80"], "is not PUBLISHED:TARGET"),
    ("services/web/ports", "8080:80", "services.web.ports must be a list"),
    ("services/web/networks", ["front", "dmz"], "services.web.networks: network 'dmz' is not declared"),
    ("services/web/networks", ["front", "front"], "network 'front' is listed twice"),
    ("services/web/deploy/update_config/delay", "-5s", "delay=-5 s is out of range (0..3600 s)"),
    ("services/web/deploy/update_config/delay", -5, "delay=-5 s is out of range"),
    ("services/web/deploy/update_config/delay", "1000h", "delay=3.6e+06 s is out of range"),
    ("services/web/deploy/update_config/delay", "soon", "delay: 'soon' is not a duration"),
    ("services/web/deploy/update_config/delay", float("nan"), "is not a number of seconds"),
    ("services/web/deploy/update_config/parallelism", 0, "parallelism=0 is out of range"),
    ("services/web/deploy/update_config/failure_action", "panic", "failure_action: 'panic' is not known"),
    ("services/web/healthcheck/interval", "1ms", "interval=0.001 s is out of range (0.05..3600 s)"),
    ("services/web/healthcheck/retries", 1000, "healthcheck.retries=1000 is out of range (1..100)"),
    ("services/web/healthcheck/test", {"cmd": "true"}, "healthcheck.test must be a list or a string, not dict"),
    ("services/web/healthcheck/test", 42, "healthcheck.test must be a list or a string, not int"),
    ("services/web/healthcheck/test", ["wget", "localhost"], "must start with CMD or CMD-SHELL"),
    ("services/web/healthcheck/test", ["CMD-SHELL", "a", "b"], "CMD-SHELL takes one string"),
    ("services/web/healthcheck/test", ["CMD"], "services.web.healthcheck.test: CMD needs a program"),
    ("services/web/image", DELETE, "services.web has no image"),
    ("services", {}, "needs at least one service"),
    ("services", {f"s{i}": {"image": "busybox"} for i in range(33)}, "33 services (a stack has at most 32)"),
    ("version", 3.8, "quote it: version: '3.8'"),
    ("version", "2.4", "is not Compose file format 3"),
])
def test_a_stack_file_is_refused_by_its_path(path, value, message):
    with pytest.raises(InvalidSpec) as err:
        StackSpec.from_compose("demo", mutate(path, value))
    assert message in str(err.value), str(err.value)
    assert err.value.fix and len(str(err.value)) < 1000


@pytest.mark.parametrize("data", [None, [], "services: {}", {"services": ["web"]}, {"services": {"web": None}},
                                  {"services": {"web": {"image": "busybox"}}, "networks": ["front"]}])
def test_a_stack_file_that_is_not_a_mapping_is_refused(data):
    with pytest.raises(InvalidSpec):
        StackSpec.from_compose("demo", data)


@pytest.mark.parametrize("name", ["", "Demo", "a/b", "..", "x" * 64, None])
def test_a_bad_stack_name_is_refused(name):
    with pytest.raises(InvalidSpec):
        StackSpec.from_compose(name, lecture())


def test_specs_refuse_what_they_cannot_be():
    with pytest.raises(InvalidSpec, match="replicas=101 is out of range"):
        ServiceSpec("demo_web", "busybox", replicas=101)
    with pytest.raises(InvalidSpec, match="service name 'a/b'"):
        ServiceSpec("a/b", "busybox")
    with pytest.raises(InvalidSpec, match="list of arguments"):
        ServiceSpec("demo_web", "busybox", cmd="httpd -f")
    with pytest.raises(InvalidSpec, match="update_failure_action 'retry'"):
        ServiceSpec("demo_web", "busybox", update_failure_action="retry")
    with pytest.raises(InvalidSpec, match="protocol 'sctp'"):
        Publish(80, 80, "sctp")
    with pytest.raises(InvalidSpec, match="interval=0 s is out of range"):
        HealthCheck(("true",), interval=0)
    with pytest.raises(InvalidSpec, match="not named for stack"):
        StackSpec("demo", (ServiceSpec("other_web", "busybox"),))
    with pytest.raises(InvalidSpec, match="which stack 'demo' lacks"):
        StackSpec("demo", (ServiceSpec("demo_web", "busybox", networks=("demo_front",)),))
    with pytest.raises(InvalidSpec, match="node availability 'gone'"):
        Node("n1", availability="gone")
    with pytest.raises(InvalidSpec, match="task state 'lost'"):
        Task("t1", "demo_web", 1, "n1", "busybox", "running", "lost")
    with pytest.raises(InvalidSpec, match="a task running on no node"):
        Task("t1", "demo_web", 1, None, "busybox", "running", "running")
    with pytest.raises(InvalidSpec, match="slot=0 is out of range"):
        Task("t1", "demo_web", 0, "n1", "busybox", "running", "new")
    with pytest.raises(InvalidSpec, match="a start needs a live task"):
        Action("start", Task("t1", "demo_web", 1, "n1", "busybox", "running", "assigned"), node="n2")
    with pytest.raises(InvalidSpec, match="desired state shutdown"):
        Action("stop", Task("t1", "demo_web", 1, "n1", "busybox", "running", "running"))
    with pytest.raises(InvalidSpec, match="new_id"):
        reconcile({WEB.name: WEB}, nodes("n1"), [Task("t1", "demo_x", 1, "n1", "busybox", "running", "complete")],
                  0.0, lambda: "t1")


def test_a_task_is_replace_friendly_and_knows_when_it_is_live():
    t = Task("t1", "demo_web", 1, "n1", "busybox", "running", "assigned")
    assert t.image == "busybox:latest" and t.live
    assert dataclasses.replace(t, state="running").live
    assert not dataclasses.replace(t, desired="shutdown").live
    assert not dataclasses.replace(t, state="failed", error="x" * 10_000).live
    assert len(dataclasses.replace(t, error="x" * 10_000).error) == orchestration.MAX_TEXT


def every_spec():
    stack = StackSpec.from_compose("demo", lecture())
    task = Task("t1", "demo_web", 2, "n1", "course/web:v1", "shutdown", "orphaned", container="demo_web.2.t1",
                error="node down", since=3.5)
    return [stack, *stack.services, stack.services[0].health, Publish(5353, 53, "udp"),
            Node("m1", "manager", "drain", "ready", "10.213.0.2"), task, Action("mark", task, reason="node n1 is down")]


@pytest.mark.parametrize("spec", every_spec(), ids=lambda s: type(s).__name__)
def test_specs_round_trip_through_json(spec):
    assert type(spec).from_dict(spec.to_dict()) == spec
    assert type(spec).from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("spec", every_spec(), ids=lambda s: type(s).__name__)
def test_from_dict_refuses_unknown_keys(spec):
    data = dict(spec.to_dict(), privileged=True)
    with pytest.raises(InvalidSpec, match="unknown .* option.*: privileged"):
        type(spec).from_dict(data)


def test_from_dict_refuses_unknown_keys_inside():
    data = copy.deepcopy(StackSpec.from_compose("demo", lecture()).to_dict())
    data["services"][0]["ports"][0]["host_ip"] = "0.0.0.0"
    with pytest.raises(InvalidSpec, match="unknown publish option.*: host_ip"):
        StackSpec.from_dict(data)
    data = copy.deepcopy(StackSpec.from_compose("demo", lecture()).to_dict())
    data["services"][0]["health"]["start_timeout"] = 1
    with pytest.raises(InvalidSpec, match="unknown healthcheck option.*: start_timeout"):
        StackSpec.from_dict(data)
    with pytest.raises(InvalidSpec, match="needs name"):
        Node.from_dict({"role": "worker"})


def test_the_module_parses_as_python_3_9_and_imports_only_the_standard_library():
    tree = ast.parse(open(orchestration.__file__).read(), feature_version=(3, 9))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= {"__future__", "dataclasses", "math", "re", "shlex"}
