"""The manager: a cluster's control loop, on the host (lab 09).

It keeps the desired state (services, :class:`labkit.wire.orchestration.ServiceSpec`) and the task records of
one cluster (/run/labkit/clusters/<name>.services.json and .tasks.json, :data:`labkit.agent.cluster.FILES`), and brings the cluster to it one
:func:`step` at a time: it observes every node (a request to its engine, ``container.ps``: the heartbeat, a
node that does not answer within HEARTBEAT seconds is down), turns what the containers did into task states,
asks :func:`labkit.wire.orchestration.reconcile` what to do, and does it through each node's engine
(:func:`labkit.agent.node.call`). Then it writes the routing mesh: every published port of a service answers
on the host (127.0.0.1 and its addresses) and on every node's address, and is balanced round-robin over the
service's running tasks (nftables ``numgen inc``), in labkit's own tables ``ip labkit_mesh`` (the host's, and
one in each node's network namespace). :func:`run` repeats the step every INTERVAL seconds (``python -m
labkit.agent.manager run CLUSTER``, the process cluster.remove and labkit cleanup stop). Standard library only.
"""
import secrets
import signal
import sys
import time

from ..wire.errors import InvalidSpec, LabkitError, NotFound
from ..wire.orchestration import Node, ServiceSpec, Task, reconcile
from ..wire.specs import ContainerSpec
from . import cluster, node
from .runner import Recorder, run, which
from .state import read_json, write_json

INTERVAL = 0.1      # seconds between two steps of the loop
HEARTBEAT = 0.5     # a node that does not answer within this is down
MESH_TABLE = "labkit_mesh"
KEEP_ENDED = 20     # ended tasks kept per service (the history back-off reads, and `service ps` shows)


def _services(name):
    raw = read_json(cluster.file(name, "services.json"), default={}) or {}
    return {k: ServiceSpec.from_dict(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _tasks(name):
    raw = read_json(cluster.file(name, "tasks.json"), default=[]) or []
    out = []
    for t in raw if isinstance(raw, list) else []:
        try:
            out.append(Task.from_dict(t))
        except LabkitError:
            continue  # a record that does not read is dropped, not trusted
    return out


def _save(name, services=None, tasks=None):
    if services is not None:
        write_json(cluster.file(name, "services.json"), {k: v.to_dict() for k, v in services.items()})
    if tasks is not None:
        write_json(cluster.file(name, "tasks.json"), [t.to_dict() for t in tasks])


# -- desired state ---------------------------------------------------------------------------------------------

def service_create(name, spec: ServiceSpec):
    """`docker service create`: the service is desired; the next step starts its tasks."""
    cluster._load(name)
    services = _services(name)
    if spec.name in services:
        raise InvalidSpec(f"service {spec.name} exists", fix="update it (service update) or remove it first")
    services[spec.name] = spec
    _save(name, services=services)
    return step(name)


def service_update(name, service, image=None, replicas=None):
    """`docker service update --image` / `docker service scale`: a new desired spec (the old one kept for a
    rollback)."""
    services = _services(name)
    if service not in services:
        raise NotFound(f"no such service: {service}", fix="see service_ls")
    old = services[service].to_dict()
    new = dict(old, **{k: v for k, v in (("image", image), ("replicas", replicas)) if v is not None})
    services[service] = ServiceSpec.from_dict(new)
    _save(name, services=services)
    prev = read_json(cluster.file(name, "previous.json"), default={}) or {}
    prev[service] = old
    write_json(cluster.file(name, "previous.json"), prev)
    return step(name)


def service_rm(name, service):
    services = _services(name)
    if services.pop(service, None) is None:
        raise NotFound(f"no such service: {service}", fix="see service_ls")
    _save(name, services=services)
    return step(name)


def service_ls(name):
    services, tasks = _services(name), _tasks(name)
    return [{"name": s.name, "image": s.image, "replicas": s.replicas,
             "running": sum(1 for t in tasks if t.service == s.name and t.state == "running" and t.live),
             "ports": [f"*:{p.published}->{p.target}/{p.proto}" for p in s.ports]} for s in services.values()]


def service_ps(name, service=None):
    return [t.to_dict() for t in sorted(_tasks(name), key=lambda t: (t.service, t.slot, -t.since))
            if service is None or t.service == service]


# -- one step of the loop ----------------------------------------------------------------------------------------

def _observe(st):
    """Each node's status and its containers (name -> ps row), by one request each: the heartbeat."""
    nodes, seen = [], {}
    for n in st["nodes"]:
        rows = None
        try:
            rows = node.call(n["id"], "container.ps", {"all": True}, timeout=HEARTBEAT)
        except LabkitError:
            pass
        nodes.append(Node(name=n["name"], role=n["role"], availability=n.get("availability", "active"),
                          status="ready" if rows is not None else "down", address=n["ip"]))
        if rows is not None:
            seen[n["name"]] = {r["name"]: r for r in rows}
    return nodes, seen


def _settle(tasks, seen, now):
    """Task states from what the nodes' containers did (a node that is down says nothing: the reconcile step
    marks its tasks orphaned)."""
    out = []
    for t in tasks:
        rows = seen.get(t.node)
        if t.live and t.container and rows is not None and t.state in ("starting", "running"):
            row = rows.get(t.container)
            if row is None:
                t = _with(t, state="failed", error="its container is gone", since=now)
            elif row["state"] != "running":
                code = row.get("exit_code")
                t = _with(t, state="complete" if code == 0 else "failed",
                          error=None if code == 0 else f"exit code {code}", since=now)
            elif t.state == "starting":
                t = _with(t, state="running", since=now)
        out.append(t)
    return out


def _with(task, **changes):
    return Task.from_dict(dict(task.to_dict(), **changes))


def _start(st, spec, task, now):
    nid = f"{st['spec']['name']}-{task.node}"
    cname = f"{task.service}.{task.slot}.{task.id}"
    cspec = ContainerSpec(image=spec.image, name=cname, cmd=spec.cmd, env=dict(spec.env), network=cluster.TASKS)
    try:
        made = node.call(nid, "container.create", {"spec": cspec.to_dict()})
        node.call(nid, "container.start", {"ref": made["id"]})
        ip = node.call(nid, "container.inspect", {"ref": made["id"]})["NetworkSettings"]["IPAddress"]
    except LabkitError as exc:
        return _with(task, state="rejected", desired="running", container=cname, error=str(exc)[:500], since=now), None
    return _with(task, state="starting", container=cname, since=now), ip


def _stop(st, task):
    nid = f"{st['spec']['name']}-{task.node}"
    if task.container:
        try:
            node.call(nid, "container.rm", {"ref": task.container, "force": True}, timeout=HEARTBEAT * 4)
        except LabkitError:
            pass  # its node is down or the container is gone: either way it no longer runs


def step(name):
    """Observe, reconcile, act, write the mesh: one turn of the control loop. Its record: the actions."""
    st = cluster._load(name)
    now = time.time()
    services = _services(name)
    nodes, seen = _observe(st)
    tasks = _settle(_tasks(name), seen, now)
    actions = reconcile(services, nodes, tasks, now, lambda: secrets.token_hex(5))
    by_id = {t.id: t for t in tasks}
    addrs = read_json(cluster.file(name, "addresses.json"), default={}) or {}
    rec = Recorder(f"step of cluster {name}")
    for a in actions:
        t = a.task
        if a.kind == "stop":
            _stop(st, t)
            t = _with(t, state="shutdown")
        elif a.kind == "start":
            t, ip = _start(st, services[t.service], t, now)
            if ip:
                addrs[t.id] = ip
        by_id[t.id] = t
        rec.add({"kind": "action", "action": a.kind, "task": t.id, "service": t.service, "slot": t.slot,
                 "node": t.node, "reason": a.reason})
    kept = _trim(list(by_id.values()))
    kept_ids = {t.id for t in kept}
    addrs = {k: v for k, v in addrs.items() if k in kept_ids}
    _save(name, tasks=kept)
    write_json(cluster.file(name, "addresses.json"), addrs)
    _mesh(st, services, kept, addrs, {n.name for n in nodes if n.status == "ready"}, rec)
    rec.fact("nodes", {n.name: n.status for n in nodes})
    return rec.to_dict(cluster=name)


def _trim(tasks):
    live = [t for t in tasks if t.live]
    ended = sorted((t for t in tasks if not t.live), key=lambda t: -t.since)
    count, keep = {}, []
    for t in ended:
        count[t.service] = count.get(t.service, 0) + 1
        if count[t.service] <= KEEP_ENDED:
            keep.append(t)
    return live + keep


# -- the routing mesh --------------------------------------------------------------------------------------------

def _ruleset(backends, local_hook):
    """nft rules: each published port DNATed round-robin to its service's running tasks; masqueraded, so that
    the answer comes back the way the request came."""
    lines = [f"table ip {MESH_TABLE} {{",
             "  chain prerouting { type nat hook prerouting priority dstnat - 1; policy accept; }",
             "  chain output { type nat hook output priority -101; policy accept; }",
             "  chain postrouting { type nat hook postrouting priority srcnat - 1; policy accept; }",
             "}"]
    rules = []
    for (port, proto), (target, ips) in sorted(backends.items()):
        if not ips:
            continue
        pick = f"numgen inc mod {len(ips)} map {{ " + ", ".join(f"{i} : {ip}" for i, ip in enumerate(ips)) + \
            f" }} : {target}"
        match = f"fib daddr type local {proto} dport {port}"
        rules.append(f"add rule ip {MESH_TABLE} prerouting {match} dnat to {pick}")
        if local_hook:
            rules.append(f"add rule ip {MESH_TABLE} output {match} dnat to {pick}")
        rules.append(f"add rule ip {MESH_TABLE} postrouting ct status dnat ip daddr {{ {', '.join(ips)} }} "
                     f"{proto} dport {target} masquerade")
    return "\n".join(lines), rules


_applied = {}  # (where) -> the script last written there by this process: written again only when it changes


def _apply(text, rules, netns_pid=None, rec=None):
    key = ("host", None) if netns_pid is None else ("node", int(netns_pid))
    script = f"table ip {MESH_TABLE}\ndelete table ip {MESH_TABLE}\n{text}\n" + "\n".join(rules) + "\n"
    if _applied.get(key) == script:
        return
    prefix = [] if netns_pid is None else ["nsenter", f"--net=/proc/{int(netns_pid)}/ns/net", "--"]
    run(prefix + ["nft", "-f", "-"], input=script, recorder=rec)
    _applied[key] = script


def _mesh(st, services, tasks, addrs, ready, rec):
    """The mesh's rules on the host and in every node this step found ``ready`` (its heartbeat answered)."""
    if not which("nft"):
        return
    backends = {}
    for s in services.values():
        ips = sorted(addrs[t.id] for t in tasks if t.service == s.name and t.live and t.state == "running"
                     and t.id in addrs)
        for p in s.ports:
            backends[(p.published, p.proto)] = (p.target, ips)
    text, rules = _ruleset(backends, local_hook=True)
    _apply(text, rules, rec=rec)
    text, rules = _ruleset(backends, local_hook=False)
    for n in st["nodes"]:
        if n["name"] in ready:
            try:
                _apply(text, rules, netns_pid=node.pid_of(n["id"]), rec=rec)
            except LabkitError:
                pass  # a node that died or went meanwhile: the next step sees it down


def remove_mesh(rec):
    """The host's mesh table (the nodes' go with their network namespaces): for cluster.remove and cleanup."""
    if which("nft") and run(["nft", "list", "table", "ip", MESH_TABLE], check=False).ok:
        rec.run(["nft", "delete", "table", "ip", MESH_TABLE])
    _applied.clear()


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
        time.sleep(max(0.0, interval - (time.monotonic() - t)))
    return 0


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "run":
        print("usage: python -m labkit.agent.manager run CLUSTER", file=sys.stderr)
        return 2
    return loop(args[1])


if __name__ == "__main__":
    raise SystemExit(main())
