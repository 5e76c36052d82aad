"""The manager: a cluster's control loop, on the host (lab 09).

It keeps the desired state of one cluster (services, :class:`labkit.wire.orchestration.ServiceSpec`; stacks;
each service's virtual address; its rolling update) and the task records, in the files beside the cluster's
record (:data:`labkit.agent.cluster.FILES`, read and written under :func:`labkit.agent.cluster.locked`), and
brings the cluster to it one :func:`step` at a time: it observes every node at once (a request to its engine,
``container.ps``: the heartbeat; a node that does not answer within HEARTBEAT seconds is down), turns what
the containers did into task states, runs the health checks that are due (a task with one runs once a check
passed; ``retries`` failures make it failed), watches each rolling update (failed: rolled back or paused),
asks :func:`labkit.wire.orchestration.reconcile` what to do, and does it through each node's engine
(:func:`labkit.agent.node.call`); containers of tasks that ended are removed. Then it writes the routing mesh
in labkit's own table ``ip labkit_mesh_<cluster>`` on the host and in every node: each published port
answers on the host (127.0.0.1 and its addresses) and on every node's address, and each service's virtual
address (which its name resolves to in the tasks of services that share a network with it: their
/etc/hosts) answers in every node; both are balanced round-robin over the service's running tasks
(nftables ``numgen inc``). :func:`loop` repeats the step every INTERVAL seconds (``python -m
labkit.agent.manager run CLUSTER``, the process cluster.manage starts and cluster.remove and labkit cleanup
stop). Standard library only.
"""
import ipaddress
import re
import secrets
import signal
import sys
import threading
import time

from ..wire.errors import InvalidSpec, LabkitError, NotFound
from ..wire.orchestration import Action, Node, ServiceSpec, StackSpec, Task, reconcile, update_failed
from ..wire.specs import ClusterSpec, ContainerSpec
from . import cluster, machine, node
from .runner import Recorder, run, which
from .state import read_json, write_json

INTERVAL = 0.1      # seconds between two steps of the loop
HEARTBEAT = 0.5     # a node that does not answer within this is down
MACHINE_HEARTBEAT = 3.0  # the same for a node on a machine of its own (labkit.agent.machine: SSH, maybe TCG)
MAX_CHECKS = 16     # health checks run at once (one thread each)
MESH_TABLE = re.compile(r"labkit_mesh(_[a-z0-9]{1,6})?")  # labkit_mesh_<cluster> (labkit_mesh: an older labkit's)
KEEP_ENDED = 20     # ended tasks kept per service (the history back-off reads, and `service ps` shows)
#: a task's container name: <service>.<slot>.<task id> (the only containers the manager removes on its own)
TASK_CONTAINER = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}\.[0-9]{1,3}\.([0-9a-f]{10})")


UPDATE_STATES = ("updating", "completed", "paused", "rollback_started", "rollback_completed", "rollback_paused")
MAX_TASKS = 2000    # task records kept in all (ended ones go first)


# -- the records, each entry checked as it is read (one that does not read is dropped, never trusted) --------

def _read(name, part, default):
    value = read_json(cluster.file(name, part), default=default)
    return value if isinstance(value, type(default)) else default


def _entries(name, part, check):
    """The file's {key: value} entries that ``check(key, value)`` accepts (it returns the value to use)."""
    out = {}
    for k, v in _read(name, part, {}).items():
        try:
            out[k] = check(k, v)
        except (LabkitError, TypeError, ValueError, KeyError, AttributeError):
            continue
    return out


def _ipv4(value):
    return str(ipaddress.IPv4Address(value))


def _services(name):
    return {spec.name: spec for spec in _entries(name, "services.json", lambda k, v: ServiceSpec.from_dict(v)).values()}


def _tasks(name):
    out = []
    for t in _read(name, "tasks.json", []):
        try:
            out.append(Task.from_dict(t))
        except (LabkitError, TypeError, ValueError, AttributeError):
            continue
    return out


def task_containers(name, node_name):
    """The containers of the cluster's recorded tasks on node ``node_name`` (cluster.remove clears a machine's)."""
    return sorted({t.container for t in _tasks(name) if t.node == node_name and t.container})


def _update_entry(k, v):
    if v["state"] not in UPDATE_STATES:
        raise ValueError(v["state"])
    previous = v.get("previous")
    return {"previous": ServiceSpec.from_dict(previous).to_dict() if previous else None, "state": v["state"],
            "since": float(v["since"]), "message": str(v.get("message", ""))[:1000]}


def _updates(name):
    return _entries(name, "updates.json", _update_entry)


def _health(name):
    return _entries(name, "health.json", lambda k, v: {"started": float(v["started"]), "next": float(v["next"]),
                                                       "fails": int(v["fails"]), "status": str(v["status"])[:20],
                                                       "output": str(v.get("output", ""))[:300]})


def _stacks(name):
    return _entries(name, "stacks.json", lambda k, v: {"services": [str(x) for x in v["services"]][:64],
                                                       "networks": [str(x) for x in v.get("networks", [])][:256]})


def _vips(name):
    """Each service's virtual address, and the index of the next one to give (never one given before, while
    the range lasts: a removed service's address is not handed to the next one its clients' /etc/hosts still
    name)."""
    raw = _read(name, "vips.json", {})
    vips = {}
    for k, v in (raw.get("vips") if isinstance(raw.get("vips"), dict) else {}).items():
        try:
            vips[k] = _ipv4(v)
        except ValueError:
            continue
    nxt = raw.get("next")
    return vips, nxt if isinstance(nxt, int) and not isinstance(nxt, bool) and 0 <= nxt < 254 else 0


def _save_vips(name, vips, nxt):
    write_json(cluster.file(name, "vips.json"), {"next": nxt, "vips": vips})


def _save_services(name, services):
    write_json(cluster.file(name, "services.json"), {k: v.to_dict() for k, v in services.items()})


# -- desired state ---------------------------------------------------------------------------------------------

def _add(name, st, services, vips, nxt, spec):
    """``spec`` desired, with a virtual address of its own; the index of the next address to give."""
    if len(services) >= 64:
        raise InvalidSpec(f"cluster {name} has 64 services", fix="remove one first (service rm, stack rm)")
    _check_ports(services, spec, st)
    hosts = list(ipaddress.ip_network(ClusterSpec.from_dict(st["spec"]).vip_subnet).hosts())
    used = set(vips.values())
    for i in range(len(hosts)):
        at = (nxt + i) % len(hosts)
        if str(hosts[at]) not in used:
            vips[spec.name] = str(hosts[at])
            services[spec.name] = spec
            return (at + 1) % len(hosts)
    raise InvalidSpec(f"cluster {name} has no virtual address left", fix="remove a service first")


def _check_ports(services, spec, st=None):
    if st is not None and ClusterSpec.from_dict(st["spec"]).machines and any(p.published == 22 for p in spec.ports):
        raise InvalidSpec("port 22 is the SSH of the cluster's machines, which the manager reaches them by",
                          fix="publish the service on another port")
    for other in services.values():
        if other.name != spec.name:
            for p in spec.ports:
                if any((q.published, q.proto) == (p.published, p.proto) for q in other.ports):
                    raise InvalidSpec(f"port {p.published}/{p.proto} is published by service {other.name} already",
                                      fix="publish another port (each is one service's, on every node)")


def _change(updates, old, new, now):
    """Record ``new`` replacing ``old``. A new image is a rolling update (the old spec kept for a rollback);
    anything else takes effect at once, and an update under way stays under way, watched as before."""
    for field in ("cmd", "env", "networks"):
        if getattr(new, field) != getattr(old, field):
            raise InvalidSpec(f"service {new.name}: labkit rolls out a new image, not a new {field}",
                              fix="remove the service (or stack) and create it again with the new " + field)
    if new.image != old.image:
        updates[new.name] = {"previous": old.to_dict(), "state": "updating", "since": now,
                             "message": f"update to {new.image}"}
    elif updates.get(new.name, {}).get("state") not in ("updating", "rollback_started"):
        updates[new.name] = {"previous": old.to_dict(), "state": "completed", "since": now, "message": "updated"}


def service_create(name, spec: ServiceSpec, step=True):
    """`docker service create`: the service is desired; a step now starts its tasks (``step=False``: the next
    step does, the manager's loop's or a loop of one's own, :func:`observe` and :func:`act`)."""
    if not isinstance(step, bool):
        raise InvalidSpec(f"step={step!r} must be True or False", fix="e.g. step=False")
    with cluster.locked(name):
        st = cluster._load(name)
        services, (vips, nxt) = _services(name), _vips(name)
        if spec.name in services:
            raise InvalidSpec(f"service {spec.name} exists", fix="update it (service update) or remove it first")
        nxt = _add(name, st, services, vips, nxt, spec)
        _save_vips(name, vips, nxt)
        _save_services(name, services)
        return _step(name) if step else {"service": spec.name, "vip": vips[spec.name]}


def service_update(name, service, image=None, replicas=None):
    """`docker service update --image` / `docker service scale`: a new desired spec (the old one kept for a
    rollback); a new image is rolled out one batch at a time, watched, and rolled back if it fails."""
    with cluster.locked(name):
        services, updates = _services(name), _updates(name)
        if service not in services:
            raise NotFound(f"no such service: {service}", fix="see service ls")
        old = services[service]
        new = ServiceSpec.from_dict(dict(old.to_dict(), **{k: v for k, v in (("image", image), ("replicas", replicas))
                                                         if v is not None}))
        services[service] = new
        _change(updates, old, new, time.time())
        write_json(cluster.file(name, "updates.json"), updates)
        _save_services(name, services)
        return _step(name)


def service_rollback(name, service):
    """`docker service rollback`: the previous spec desired again (and the current one kept as previous)."""
    with cluster.locked(name):
        services, updates = _services(name), _updates(name)
        if service not in services:
            raise NotFound(f"no such service: {service}", fix="see service ls")
        previous = (updates.get(service) or {}).get("previous")
        if not previous:
            raise InvalidSpec(f"service {service} has no previous spec", fix="update it first (service update)")
        current, services[service] = services[service], ServiceSpec.from_dict(previous)
        updates[service] = {"previous": current.to_dict(), "state": "rollback_started", "since": time.time(),
                            "message": "manually requested rollback"}
        write_json(cluster.file(name, "updates.json"), updates)
        _save_services(name, services)
        return _step(name)


def _forget(name, gone):
    """The records of removed services: their virtual addresses, updates, and places in stacks."""
    vips, nxt = _vips(name)
    _save_vips(name, {k: v for k, v in vips.items() if k not in gone}, nxt)
    write_json(cluster.file(name, "updates.json"), {k: v for k, v in _updates(name).items() if k not in gone})
    stacks = _stacks(name)
    for entry in stacks.values():
        entry["services"] = [s for s in entry["services"] if s not in gone]
    write_json(cluster.file(name, "stacks.json"), stacks)


def service_rm(name, service):
    with cluster.locked(name):
        services = _services(name)
        if services.pop(service, None) is None:
            raise NotFound(f"no such service: {service}", fix="see service ls")
        _save_services(name, services)
        _forget(name, {service})
        return _step(name)


def _running(tasks, service):
    return sum(1 for t in tasks if t.service == service and t.state == "running" and t.live)


def service_ls(name):
    services, tasks = _services(name), _tasks(name)
    updates, (vips, _) = _updates(name), _vips(name)
    return [{"name": s.name, "image": s.image, "replicas": s.replicas, "running": _running(tasks, s.name),
             "ports": [f"*:{p.published}->{p.target}/{p.proto}" for p in s.ports],
             "update": (updates.get(s.name) or {}).get("state"), "vip": vips.get(s.name)} for s in services.values()]


def service_inspect(name, service):
    """`docker service inspect`: the spec, the previous one, the update's state, the virtual address."""
    services = _services(name)
    if service not in services:
        raise NotFound(f"no such service: {service}", fix="see service ls")
    update = _updates(name).get(service) or {}
    return {"name": service, "spec": services[service].to_dict(), "previous": update.get("previous"),
            "update": {k: update[k] for k in ("state", "since", "message") if k in update} or None,
            "vip": _vips(name)[0].get(service), "running": _running(_tasks(name), service)}


def service_ps(name, service=None):
    return [t.to_dict() for t in sorted(_tasks(name), key=lambda t: (t.service, t.slot, -t.since))
            if service is None or t.service == service]


# -- stacks ------------------------------------------------------------------------------------------------------

def stack_deploy(name, spec: StackSpec):
    """`docker stack deploy`: each service of the stack created, or updated where it exists (as a rolling
    update); services of an earlier deploy that the file no longer names are kept (Docker's default)."""
    with cluster.locked(name):
        st = cluster._load(name)
        services, (vips, nxt) = _services(name), _vips(name)
        updates, stacks = _updates(name), _stacks(name)
        mine = set(stacks.get(spec.name, {}).get("services", []))
        for s in spec.services:
            if s.name in services and s.name not in mine:
                raise InvalidSpec(f"service {s.name} exists outside stack {spec.name}",
                                  fix="remove it first (service rm), or name the stack otherwise")
        created, updated, now = [], [], time.time()
        for s in spec.services:
            if s.name not in services:
                nxt = _add(name, st, services, vips, nxt, s)
                created.append(s.name)
            elif services[s.name] != s:
                _check_ports(services, s, st)
                _change(updates, services[s.name], s, now)
                services[s.name] = s
                updated.append(s.name)
        stacks[spec.name] = {"networks": list(spec.networks),
                             "services": sorted(mine | {s.name for s in spec.services})}
        _save_vips(name, vips, nxt)
        for part, value in (("updates.json", updates), ("stacks.json", stacks)):
            write_json(cluster.file(name, part), value)
        _save_services(name, services)
        return dict(_step(name), stack=spec.name, created=created, updated=updated)


def stack_ls(name):
    return [{"name": k, "services": len(v["services"])} for k, v in sorted(_stacks(name).items())]


def _stack(name, stack):
    entry = _stacks(name).get(stack)
    if entry is None:
        raise NotFound(f"no such stack: {stack}", fix="see stack ls")
    return entry


def stack_ps(name, stack):
    members = set(_stack(name, stack)["services"])
    return [t for t in service_ps(name) if t["service"] in members]


def stack_rm(name, stack):
    """`docker stack rm`: its services (their tasks stop at this step) and its record."""
    with cluster.locked(name):
        members = set(_stack(name, stack)["services"])
        services = _services(name)
        removed = sorted(s for s in members if services.pop(s, None) is not None)
        _save_services(name, services)
        _forget(name, members)
        stacks = _stacks(name)
        stacks.pop(stack, None)
        write_json(cluster.file(name, "stacks.json"), stacks)
        return dict(_step(name), stack=stack, removed=removed)


def _names(name, service, services, vips):
    """The names a task of ``service`` resolves (its /etc/hosts): every service that shares one of its
    networks, by its full name and, within one stack, by its name in the stack file."""
    me = services[service]
    stack = next((k for k, v in _stacks(name).items() if service in v["services"]), None)
    pairs = []
    for other in services.values():
        if other.name in vips and set(other.networks) & set(me.networks):
            pairs.append((other.name, vips[other.name]))
            if stack and other.name.startswith(stack + "_"):
                pairs.append((other.name[len(stack) + 1:], vips[other.name]))
    return tuple(pairs)


# -- one step of the loop ----------------------------------------------------------------------------------------

def _observe(st):
    """Each node's status and its containers (name -> ps row), by one request to each, all at once: the
    heartbeat. A node that does not answer within HEARTBEAT seconds (dead, frozen) is down."""
    rows = {}

    def ask(n):
        # a node found down at the last step is asked again with a short timeout: a hung machine must not
        # hold every step for the whole HEARTBEAT (it is back once it answers within that)
        if n.get("machine"):  # a computer of its own, over SSH (and, in a TCG guest, slow to answer)
            timeout = MACHINE_HEARTBEAT
        else:
            timeout = INTERVAL if n["id"] in _down else HEARTBEAT
        try:
            if n.get("machine") and (n["id"] in _down or n["id"] not in _joined):
                if cluster.rejoin(st["spec"]["name"], n, timeout):  # (a machine that rebooted forgot the cluster)
                    _sent_mesh.pop(n["machine"], None)
                _joined.add(n["id"])
            rows[n["name"]] = node.call(n["id"], "container.ps", {"all": True}, timeout=timeout)
            _down.discard(n["id"])
        except LabkitError:
            _down.add(n["id"])
            _sent_mesh.pop(n.get("machine"), None)  # (one that comes back may have lost its mesh: send it again)
    _together(ask, st["nodes"])
    nodes = [Node(name=n["name"], role=n["role"], availability=n.get("availability", "active"),
                  status="ready" if n["name"] in rows else "down", address=n["ip"]) for n in st["nodes"]]
    return nodes, {k: {r["name"]: r for r in v} for k, v in rows.items()}


_down = set()  # ids of the nodes this process found down at its last heartbeat
_joined = set()  # ids of the machine nodes this process found members of their cluster


def _together(fn, items):
    """fn(item) for every item, each in a thread of its own, all waited for."""
    threads = [threading.Thread(target=fn, args=(i,), daemon=True) for i in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _settle(tasks, seen, services, now):
    """Task states from what the nodes' containers did (a node that is down says nothing: the reconcile step
    marks its tasks orphaned). A task of a service with a health check runs once a check passed
    (:func:`_check_health`), not when its container starts."""
    out = []
    for t in tasks:
        rows = seen.get(t.node)
        if t.live and t.container and rows is not None and t.state in ("starting", "running"):
            row = rows.get(t.container)
            spec = services.get(t.service)
            if row is None:
                t = _with(t, state="failed", error="its container is gone", since=now)
            elif row["state"] != "running":
                code = row.get("exit_code")
                t = _with(t, state="complete" if code == 0 else "failed",
                          error=None if code == 0 else f"exit code {code}", since=now)
            elif t.state == "starting" and (spec is None or spec.health is None):
                t = _with(t, state="running", since=now)
        out.append(t)
    return out


def _with(task, **changes):
    return Task.from_dict(dict(task.to_dict(), **changes))


def _node_id(st, node_name):
    """A node's id (:attr:`labkit.wire.specs.NodeSpec.id`) from its cluster's record and its name."""
    return f"{st['spec']['name']}-{node_name}"


def _check_health(st, services, tasks, health, now, seen):
    """Each live task's health check, when due (every ``interval`` seconds; all due checks at once): a pass
    makes a starting task running; ``retries`` failures in a row after ``start_period`` make it failed
    (unhealthy), and its container is removed. ``health`` (task id -> its record) is changed in place."""
    due = []
    for t in tasks:
        spec = services.get(t.service)
        if spec is None or spec.health is None or not t.live or t.state not in ("starting", "running") \
                or t.node not in seen:  # (a node that did not answer the heartbeat is not asked again)
            continue
        h = health.setdefault(t.id, {"started": now, "next": now + spec.health.interval, "fails": 0,
                                     "status": "starting"})
        if now >= h["next"]:
            due.append(t)
    due = sorted(due, key=lambda t: health[t.id]["next"])[:MAX_CHECKS]  # the rest at the next step
    for t in due:
        health[t.id]["next"] = now + services[t.service].health.interval
    results = {}

    def check(t):
        try:
            hc = services[t.service].health
            res = node.call(_node_id(st, t.node), "container.exec", {"ref": t.container, "argv": list(hc.cmd),
                                                                     "timeout": hc.timeout}, timeout=hc.timeout + 1)
            results[t.id] = (res["exit_code"], (res.get("stdout") or "") + (res.get("stderr") or ""))
        except LabkitError as exc:
            results[t.id] = (None, str(exc))
    _together(check, due)
    out = []
    for t in tasks:
        if t.id in results:
            hc, h = services[t.service].health, health[t.id]
            code, output = results[t.id]
            h["output"] = output.strip()[-300:]
            if code == 0:
                h.update(fails=0, status="healthy")
                if t.state == "starting":
                    t = _with(t, state="running", since=now)
            elif now - h["started"] >= hc.start_period:
                h["fails"] += 1
                if h["fails"] >= hc.retries:
                    h["status"] = "unhealthy"
                    _stop(st, t)
                    t = _with(t, state="failed", since=now, error=f"unhealthy: {h['fails']} health checks failed in a "
                              f"row (last: exit {code}: {h['output'][-120:] or 'no output'})")
        out.append(t)
    live = {t.id for t in out if t.live}
    for k in [k for k in health if k not in live]:
        del health[k]
    return out


def _watch_updates(services, updates, tasks, now, rec):
    """Each rolling update: failed (:func:`labkit.wire.orchestration.update_failed`) -> the service's
    update_failure_action (rollback: the previous spec desired again; pause: no more batches); a rollback that
    fails too is paused (Swarm's default rollback_failure_action); done -> completed (rollback_completed).
    Returns whether ``services`` changed."""
    changed = False
    for name, u in updates.items():
        spec = services.get(name)
        if spec is None:
            continue
        if u.get("state") == "updating" and spec.update_failure_action != "continue" \
                and update_failed(spec, tasks, now):
            bad = max((t for t in tasks if t.service == name and t.image == spec.image and t.error),
                      key=lambda t: t.since, default=None)
            why = f"task {bad.id} on {bad.node}: {bad.error}" if bad else "a new task failed"
            if spec.update_failure_action == "rollback" and u.get("previous"):
                prev = ServiceSpec.from_dict(u["previous"])
                services[name], changed = prev, True
                updates[name] = {"previous": spec.to_dict(), "state": "rollback_started", "since": now,
                                 "message": f"update to {spec.image} failed ({why}); rolling back to {prev.image}"}
            else:
                updates[name] = dict(u, state="paused", since=now, message=f"update paused: {why}")
            rec.fact(f"update of {name}", updates[name]["message"])
        elif u.get("state") == "rollback_started" and update_failed(spec, tasks, now):
            updates[name] = dict(u, state="rollback_paused", since=now,
                                 message=f"rollback to {spec.image} paused: its tasks fail too")
            rec.fact(f"update of {name}", updates[name]["message"])
        elif u.get("state") in ("updating", "rollback_started") and _rolled_out(spec, tasks):
            done = "completed" if u["state"] == "updating" else "rollback_completed"
            updates[name] = dict(u, state=done, since=now, message=f"update completed: {spec.image}" if done ==
                                 "completed" else u.get("message", "").replace("rolling back", "rolled back"))
    return changed


def _rolled_out(spec, tasks):
    live = [t for t in tasks if t.service == spec.name and t.live]
    return all(t.image == spec.image for t in live) and \
        {t.slot for t in live if t.state == "running"} >= set(range(1, spec.replicas + 1))


def _start(st, spec, task, now, hosts):
    nid = _node_id(st, task.node)
    cname = f"{task.service}.{task.slot}.{task.id}"
    task = _with(task, image=spec.image)
    try:
        cspec = ContainerSpec(image=spec.image, name=cname, cmd=spec.cmd, env=dict(spec.env), network=cluster.TASKS,
                              extra_hosts=hosts)
        on = next((n.get("machine") for n in st["nodes"] if n["name"] == task.node), None)
        if on:  # a machine of its own: its store holds only what the manager handed it (Swarm's workers pull)
            machine.push_image(on, spec.image)
        made = node.call(nid, "container.create", {"spec": cspec.to_dict()})
        node.call(nid, "container.start", {"ref": made["id"]})
        ip = node.call(nid, "container.inspect", {"ref": made["id"]})["NetworkSettings"]["IPAddress"]
    except LabkitError as exc:
        return _with(task, state="rejected", desired="running", container=cname, error=str(exc)[:500], since=now), None
    return _with(task, state="starting", container=cname, since=now), ip


def _stop(st, task):
    if task.container:
        _remove(st, task.node, task.container)


def _remove(st, node_name, container):
    try:
        node.call(_node_id(st, node_name), "container.rm", {"ref": container, "force": True},
                  timeout=HEARTBEAT * 4)
    except LabkitError:
        pass  # its node is down or the container is gone: either way it no longer runs


def _sweep(st, seen, tasks):
    """Containers of tasks that no longer hold their slot (ended, stopped, orphaned while their node was
    down, or no longer on record), on the nodes that answered: removed (a task's record keeps its story)."""
    by_id = {t.id: t for t in tasks}
    for n in st["nodes"]:
        for cname in seen.get(n["name"], {}):
            m = TASK_CONTAINER.fullmatch(cname)
            t = by_id.get(m.group(1)) if m else None
            if m and (t is None or not t.live or t.node != n["name"] or t.container != cname):
                _remove(st, n["name"], cname)


def step(name):
    """Observe, reconcile, act, write the mesh: one turn of the control loop. Its record: the actions."""
    with cluster.locked(name):
        return _step(name)


def _step(name):
    st, now, rec = cluster._load(name), time.time(), Recorder(f"step of cluster {name}")
    look = _look(name, st, now, rec)
    paused = {k for k, u in look["updates"].items() if u.get("state") in ("paused", "rollback_paused")}
    actions = reconcile(look["services"], look["nodes"], look["tasks"], now, lambda: secrets.token_hex(5),
                        paused=paused)
    return _act(name, st, look, actions, now, rec)


def observe(name):
    """The first half of a step, for a control loop of one's own (lab 09: the student's reconcile): the
    services, the nodes as the heartbeat found them and the tasks as their containers left them (health
    checks and rolling updates watched as in :func:`step`), saved, and the mesh written for the tasks that
    run; nothing started or stopped."""
    with cluster.locked(name):
        st, now = cluster._load(name), time.time()
        rec = Recorder(f"observe cluster {name}")
        look = _look(name, st, now, rec)
        _save_look(name, look, look["tasks"])
        _mesh(st, look["services"], look["tasks"], _addresses(look), _vips(name)[0], _ready(look), rec)
        return {"now": now, "services": {k: v.to_dict() for k, v in look["services"].items()},
                "nodes": [n.to_dict() for n in look["nodes"]], "tasks": [t.to_dict() for t in look["tasks"]],
                "paused": sorted(k for k, u in look["updates"].items() if "paused" in str(u.get("state")))}


def act(name, actions):
    """The second half: ``actions`` (:class:`labkit.wire.orchestration.Action` s as dicts, e.g. from one's
    own reconcile over :func:`observe`'s answer) carried out as :func:`step` does. Each is checked against the
    records first: a stop or mark names a task on record, a start a new task (an id of 10 hex digits, as
    ``secrets.token_hex(5)`` gives) of a service that exists, on a node of this cluster."""
    if not isinstance(actions, list) or len(actions) > 1000:
        raise InvalidSpec("actions must be a list of at most 1000 actions", fix="e.g. [a.to_dict() for a in actions]")
    actions = [a if isinstance(a, Action) else Action.from_dict(a) for a in actions]
    with cluster.locked(name):
        st, now, rec = cluster._load(name), time.time(), Recorder(f"act on cluster {name}")
        look = _look(name, st, now, rec)
        try:
            checked = _checked(actions, look, now)
        except LabkitError:
            _save_look(name, look, look["tasks"])  # what was observed stands, whatever the actions
            raise
        return _act(name, st, look, checked, now, rec)


def _checked(actions, look, now):
    """A client's actions as the records allow them (InvalidSpec / NotFound otherwise): a stop shuts a live
    task down, a mark orphans one (each changes the recorded task's states only: its node and container stay
    the record's); a start starts a new task (an id of 10 hex digits never used) of an existing service in a
    slot 1..replicas that no other live task holds, on a node of this cluster, or assigns a recorded task
    that has no node yet."""
    known, nodes, services = {t.id: t for t in look["tasks"]}, {n.name for n in look["nodes"]}, look["services"]
    held = {(t.service, t.slot): t.id for t in look["tasks"] if t.live}
    out, ids = [], set()
    for a in actions:
        t = a.task
        if t.id in ids:
            raise InvalidSpec(f"task {t.id} appears in two actions", fix="act on each task once per call")
        ids.add(t.id)
        if a.kind in ("stop", "mark"):
            if t.id not in known or not known[t.id].live:
                raise NotFound(f"{a.kind}: no live task {t.id} on record", fix="act on the tasks observe() gave")
            state = "orphaned" if a.kind == "mark" else known[t.id].state
            out.append(Action(a.kind, _with(known[t.id], desired="shutdown", state=state, since=now), None, a.reason))
            continue
        spec = services.get(t.service)
        old = known.get(t.id)
        fresh = old is None and re.fullmatch(r"[0-9a-f]{10}", t.id) and held.get((t.service, t.slot)) is None
        assigning = old is not None and old.node is None and old.live and (old.service, old.slot) == (t.service, t.slot)
        if spec is None or a.node not in nodes or t.slot > spec.replicas or not (fresh or assigning):
            raise InvalidSpec(f"start: task {t.id} of {t.service} (slot {t.slot}) on {a.node} is not a new task in a "
                              f"free slot of a service of this cluster, on one of its nodes",
                              fix="new_id = lambda: secrets.token_hex(5); services, slots and nodes from observe()")
        held[(t.service, t.slot)] = t.id
        out.append(Action("start", Task(t.id, t.service, t.slot, a.node, spec.image, "running", "assigned",
                                        since=now), a.node, a.reason))
    return out


def _look(name, st, now, rec):
    services, updates, health = _services(name), _updates(name), _health(name)
    nodes, seen = _observe(st)
    tasks = _settle(_tasks(name), seen, services, now)
    tasks = _check_health(st, services, tasks, health, now, seen)
    rolled = _watch_updates(services, updates, tasks, now, rec)
    return {"services": services, "updates": updates, "health": health, "nodes": nodes, "seen": seen,
            "tasks": tasks, "rolled": rolled}


def _save_look(name, look, tasks):
    """The records a look changed, together: the tasks, and the services with their updates (a rollback
    changes both), the health checks' counts."""
    write_json(cluster.file(name, "tasks.json"), [t.to_dict() for t in tasks])
    if look["rolled"]:
        _save_services(name, look["services"])
    for part, value in (("updates.json", look["updates"]), ("health.json", look["health"])):
        write_json(cluster.file(name, part), value)


def _act(name, st, look, actions, now, rec):
    services, (vips, _) = look["services"], _vips(name)
    by_id = {t.id: t for t in look["tasks"]}
    addrs = _addresses(look)
    for a in actions:
        t = a.task
        if a.kind == "stop":
            _stop(st, t)
            t = _with(t, state="shutdown")
        elif a.kind == "start":
            t, ip = _start(st, services[t.service], t, now, _names(name, t.service, services, vips))
            if ip:
                addrs[t.id] = ip
        by_id[t.id] = t
        rec.add({"kind": "action", "action": a.kind, "task": t.id, "service": t.service, "slot": t.slot,
                 "node": t.node, "reason": a.reason})
    kept = _trim(list(by_id.values()), services)
    _sweep(st, look["seen"], kept)
    _save_look(name, look, kept)
    _mesh(st, services, kept, addrs, vips, _ready(look), rec)
    rec.fact("nodes", {n.name: n.status for n in look["nodes"]})
    return rec.to_dict(cluster=name)


def _ready(look):
    return {n.name for n in look["nodes"] if n.status == "ready"}


def _addresses(look):
    """Each running task's address, as its node's engine reported it at this step's heartbeat."""
    out = {}
    for t in look["tasks"]:
        row = look["seen"].get(t.node, {}).get(t.container) if t.container else None
        if row and row.get("ip"):
            try:
                out[t.id] = _ipv4(row["ip"])
            except ValueError:
                continue
    return out


def _trim(tasks, services):
    """The records kept: every live task, and the last KEEP_ENDED ended ones of each existing service, at most
    MAX_TASKS in all."""
    live = [t for t in tasks if t.live]
    ended = sorted((t for t in tasks if not t.live and t.service in services), key=lambda t: -t.since)
    count, keep = {}, []
    for t in ended:
        count[t.service] = count.get(t.service, 0) + 1
        if count[t.service] <= KEEP_ENDED:
            keep.append(t)
    return live + keep[:max(0, MAX_TASKS - len(live))]


# -- the routing mesh --------------------------------------------------------------------------------------------

def mesh_table(name):
    """The cluster's routing-mesh table (``ip labkit_mesh_<name>``, on the host and in each of its nodes)."""
    cluster.file(name, "lock")  # (a name that is not a cluster's is refused there)
    return mesh_table_name(name)


def mesh_table_name(name):
    """``labkit_mesh_<name>`` for a checked cluster name (on a machine node, where no cluster record is)."""
    from ..wire.specs import check_cluster_name
    return f"labkit_mesh_{check_cluster_name(name)}"


def ruleset(table, backends, vips, local_hook):
    """nft rules: each published port DNATed round-robin to its service's running tasks, and each service's
    virtual address to the same tasks (any port); masqueraded, so that the answer comes back the way the
    request came (also from a task on the same node as its client)."""
    lines = [f"table ip {table} {{",
             "  chain prerouting { type nat hook prerouting priority dstnat - 1; policy accept; }",
             "  chain output { type nat hook output priority -101; policy accept; }",
             "  chain postrouting { type nat hook postrouting priority srcnat - 1; policy accept; }",
             "}"]
    rules = []
    hooks = ("prerouting", "output") if local_hook else ("prerouting",)

    def pick(ips, port=""):
        return f"numgen inc mod {len(ips)} map {{ " + ", ".join(f"{i} : {ip}" for i, ip in enumerate(ips)) + \
            f" }}{port}"
    for (port, proto), (target, ips) in sorted(backends.items()):
        if ips:
            rules += [f"add rule ip {table} {h} fib daddr type local {proto} dport {port} dnat to "
                      f"{pick(ips, f' : {target}')}" for h in hooks]
            rules.append(f"add rule ip {table} postrouting ct status dnat ip daddr {{ {', '.join(ips)} }} "
                         f"{proto} dport {target} masquerade")
    for vip, ips in sorted(vips.items()):
        if ips:
            rules += [f"add rule ip {table} {h} ip daddr {vip} dnat to {pick(ips)}" for h in hooks]
            rules.append(f"add rule ip {table} postrouting ct status dnat ct original ip daddr {vip} masquerade")
    return "\n".join(lines), rules


_applied = {}  # (where) -> the script last written there by this process: written again only when it changes


def apply_rules(table, text, rules, netns_pid=None, rec=None, remember=True):
    """Write ``table`` anew (``nft -f``: the old one goes in the same transaction), here or in the network
    namespace of ``netns_pid``; not again while its text has not changed (``remember``: this process is the
    only one that writes it)."""
    key = (table, None if netns_pid is None else int(netns_pid))
    script = f"table ip {table}\ndelete table ip {table}\n{text}\n" + "\n".join(rules) + "\n"
    if remember and _applied.get(key) == script:
        return
    prefix = [] if netns_pid is None else ["nsenter", f"--net=/proc/{int(netns_pid)}/ns/net", "--"]
    run(prefix + ["nft", "-f", "-"], input=script, recorder=rec)
    if remember:
        _applied[key] = script


def _mesh(st, services, tasks, addrs, vips, ready, rec):
    """The mesh's rules on the host and in every node this step found ``ready`` (its heartbeat answered)."""
    if not which("nft"):
        return
    backends, virtual = {}, {}
    for s in services.values():
        ips = sorted(addrs[t.id] for t in tasks if t.service == s.name and t.live and t.state == "running"
                     and t.id in addrs)
        for p in s.ports:
            backends[(p.published, p.proto)] = (p.target, ips)
        if s.name in vips:
            virtual[vips[s.name]] = ips
    table = mesh_table(st["spec"]["name"])
    text, rules = ruleset(table, backends, virtual, local_hook=True)
    apply_rules(table, text, rules, rec=rec)
    text, rules = ruleset(table, backends, virtual, local_hook=False)
    wire = {"ports": [[p, proto, target, ips] for (p, proto), (target, ips) in sorted(backends.items())],
            "vips": [[vip, ips] for vip, ips in sorted(virtual.items())]}
    for n in st["nodes"]:
        if n["name"] in ready:
            try:
                if n.get("machine"):  # a computer of its own: its agent writes the same rules there
                    if _sent_mesh.get(n["machine"]) != wire:
                        node.call_machine(n["id"], "machine.mesh", {"cluster": st["spec"]["name"], **wire})
                        _sent_mesh[n["machine"]] = wire
                else:
                    apply_rules(table, text, rules, netns_pid=node.pid_of(n["id"]), rec=rec)
            except LabkitError:
                pass  # a node that died or went meanwhile: the next step sees it down


_sent_mesh = {}  # machine address -> the mesh this process last sent it


def remove_mesh(name, rec):
    """The cluster's mesh table on the host (its nodes' go with their network namespaces): for cluster.remove."""
    table = mesh_table(name)
    if which("nft") and run(["nft", "list", "table", "ip", table], check=False).ok:
        rec.run(["nft", "delete", "table", "ip", table])
    for key in [k for k in _applied if k[0] == table]:
        del _applied[key]


def mesh_leftovers():
    """The host's mesh tables (``ip labkit_mesh_<cluster>``), whatever the records say: for labkit cleanup."""
    if not which("nft"):
        return []
    res = run(["nft", "list", "tables", "ip"], check=False)
    return [w[2] for w in (line.split() for line in res.stdout.splitlines())
            if len(w) == 3 and w[:2] == ["table", "ip"] and MESH_TABLE.fullmatch(w[2])] if res.ok else []


# -- the loop ----------------------------------------------------------------------------------------------------

def loop(name, interval=INTERVAL):
    """Step until SIGTERM; a step that fails is said in the log and the loop goes on."""
    done = []
    signal.signal(signal.SIGTERM, lambda *_: done.append(1))
    while not done:
        t = time.monotonic()
        try:
            step(name)
        except NotFound:
            return 0  # the cluster is gone
        except Exception as exc:  # noqa: BLE001 - one failed step is no reason to stop managing
            print(f"manager {name}: step failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        time.sleep(max(0.02, interval - (time.monotonic() - t)))  # (never straight back: requests wait too)
    return 0


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "run":
        print("usage: python -m labkit.agent.manager run CLUSTER", file=sys.stderr)
        return 2
    return loop(args[1])


if __name__ == "__main__":
    raise SystemExit(main())
