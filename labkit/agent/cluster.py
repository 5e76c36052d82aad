"""Clusters: nodes on one host wired as one network of machines (lab 09).

A cluster is a labkit bridge network on the host (``lkbr-cl<name>``), a manager node and its workers on it
(:mod:`labkit.agent.node`), and one address range per node for its containers: node i's engine gets a
network ``tasks`` with the i-th /24 of the cluster's task range, and the host routes that /24 to node i's
address. A container on one node reaches a container on another by its own address (through the host,
as a flat "host-gw" overlay does it between machines), so every task of a service has an address of its
own in the cluster; the last /24 of the range holds the services' virtual addresses (routed nowhere in the
nodes: only the manager's DNAT rules give them a meaning). State: /run/labkit/clusters/<name>.json (written
before anything is made; changed under :func:`locked`), undone by :func:`remove` and by ``labkit cleanup``.
Standard library only.
"""
import contextlib
import fcntl
import ipaddress
import os
import signal
import time

from ..wire.errors import Conflict, InvalidSpec, LabkitError, NotFound, TransportError
from ..wire.specs import CLUSTER_NAME, RUN_DIR, ClusterSpec, NetworkSpec, NodeSpec
from . import machine, network, node
from .runner import Recorder, pid_fields, recorded_process, run, start_helper
from .state import private_dir, read_json, write_json

CLUSTERS = RUN_DIR + "/clusters"
TASKS = "tasks"  # the network each node's containers join


def _path(name):
    if not isinstance(name, str) or not CLUSTER_NAME.fullmatch(name):
        raise NotFound(f"no such cluster: {name!r}", fix="see lab.call('cluster.list')")
    return f"{CLUSTERS}/{name}.json"


#: files beside a cluster's record: its manager's records (labkit.agent.manager), its log and its lock
FILES = ("services.json", "tasks.json", "updates.json", "health.json", "vips.json",
         "stacks.json", "manager.log", "lock")


def file(name, part):
    """The cluster's file ``part`` (one of FILES), beside its record."""
    _path(name)  # (a name that is not a cluster's is NotFound here too)
    if part not in FILES:
        raise ValueError(f"{part!r} is none of a cluster's files")
    return f"{CLUSTERS}/{name}.{part}"


@contextlib.contextmanager
def locked(name):
    """The cluster's lock, held while its record or its manager's records are read, changed and written (the
    manager's loop and a request such as service.create, in two processes, never interleave)."""
    _load(name)
    fd = os.open(file(name, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(name):
    st = read_json(_path(name), default=None)
    if not isinstance(st, dict) or not isinstance(st.get("spec"), dict):
        raise NotFound(f"no such cluster: {name}", fix="see lab.call('cluster.list')")
    return st


def create(spec: ClusterSpec):
    """The cluster's network, its nodes (manager first), each node's task network and the host's routes to
    them; its record (each node: name, role, address, task subnet)."""
    rec = Recorder(f"create cluster {spec.name}")
    for m in spec.machines:
        machine.ssh_argv(m)  # (this machine can reach them: its cluster key is here; refused before anything is made)
    private_dir(CLUSTERS)
    if os.path.exists(_path(spec.name)):
        raise Conflict(f"cluster {spec.name} exists", fix=f"remove it first: lab.call('cluster.remove', "
                                                           f"name={spec.name!r})")
    for part in FILES:  # a cluster's of this name whose record went without them (its manager's old records)
        if os.path.lexists(file(spec.name, part)):
            os.unlink(file(spec.name, part))
    st = {"spec": spec.to_dict(), "created": time.time(), "nodes": [], "routes": [], "via": None}
    write_json(_path(spec.name), st)
    try:
        rec.steps += network.create(NetworkSpec(name=spec.network, subnet=spec.subnet))["steps"]
        net = ipaddress.ip_network(spec.subnet)
        # with machines: this machine's own address on their network, where they route the cluster's ranges to
        ways = [machine.route_to(m) for m in spec.machines]  # (this machine's address and interface towards each)
        st["via"] = ways[0][0] if ways else None
        for dev in sorted({dev for _, dev in ways}):
            network.loopback_out(dev, rec)  # (the mesh's 127.0.0.1 answered by tasks on the machines too)
        for i, name in enumerate(spec.node_names()):
            on = spec.machine_of(i)  # a worker on a machine of its own, or None: a node of this host
            ip = on or str(net.network_address + 10 + i)  # manager .10, worker1 .11, ...: easy to read on a slide
            made = node.create(NodeSpec(cluster=spec.name, name=name, network=spec.network,
                                        ip=None if on else ip, machine=on))
            rec.steps += made["steps"]
            nid = made["id"]
            subnet = spec.task_subnet(i)
            st["nodes"].append({"id": nid, "name": name, "role": "manager" if i == 0 else "worker", "ip": ip,
                                "tasks": subnet, "availability": "active", **({"machine": on} if on else {})})
            write_json(_path(spec.name), st)
            node.call(nid, "net.create", {"spec": NetworkSpec(name=TASKS, subnet=subnet).to_dict()})
            if on:
                st["nodes"][-1]["tasks_made"] = True  # (cluster.remove takes away only the network it made there)
                rec.run(["ip", "route", "replace", subnet, "via", on])
            else:
                # a virtual address with no DNAT rule (a service with no task running) goes nowhere, not to the host
                rec.run(["nsenter", f"--net=/proc/{node.pid_of(nid)}/ns/net", "--", "ip", "route", "add",
                         "unreachable", spec.vip_subnet])
                rec.run(["ip", "route", "replace", subnet, "via", ip, "dev", NetworkSpec(name=spec.network).bridge])
            st["routes"].append(subnet)
            write_json(_path(spec.name), st)
        write_json(_path(spec.name), st)
        for n in st["nodes"]:  # each machine routes the other nodes' ranges (and this one's network) on to them
            if n.get("machine"):
                rec.steps += _join(st, n)["steps"]
    except BaseException:
        try:
            remove(spec.name)
        except LabkitError:
            pass
        raise
    return rec.to_dict(cluster=inspect(spec.name))


def _join(st, n, timeout=30):
    """Machine node ``n`` joins the cluster of record ``st``: routes to every other node's task range (through
    the machine that node is, or this one) and to this machine's cluster network, the virtual range
    unreachable."""
    spec = ClusterSpec.from_dict(st["spec"])
    routes = [[o["tasks"], o.get("machine") or st["via"]] for o in st["nodes"] if o["id"] != n["id"]]
    return node.call_machine(n["id"], "machine.join", {"cluster": spec.name, "unreachable": spec.vip_subnet,
                                                        "routes": routes + [[spec.subnet, st["via"]]]},
                             timeout=timeout)


def rejoin(name, n, timeout):
    """For the manager, of machine node ``n`` that answers again (or for the first time in its process): when
    the machine forgot the cluster (a reboot empties /run, and with it its routes, its task network and its
    record), make them again before it takes tasks. True when it had to."""
    said = node.call_machine(n["id"], "machine.hello", timeout=timeout)
    if name in (said.get("clusters") or []):
        return False
    st = _load(name)
    try:
        node.call(n["id"], "net.create", {"spec": NetworkSpec(name=TASKS, subnet=n["tasks"]).to_dict()},
                  timeout=timeout)
    except Conflict:
        pass  # (its network's record outlived the reboot: labkit makes its bridge again with its next container)
    _join(st, n, timeout=timeout)
    return True


def inspect(name):
    """The cluster's record, each node with its live status (:func:`labkit.agent.node.inspect`)."""
    st = _load(name)
    nodes = []
    for n in st["nodes"]:
        try:
            status = node.inspect(n["id"])["status"]
        except NotFound:
            status = "removed"
        nodes.append({**n, "status": status})
    return {"name": name, "spec": st["spec"], "created": st.get("created"), "nodes": nodes,
            "manager": recorded_process(st.get("manager") or {}) or None}


def _recorded():
    """The names of the recorded clusters: only <name>.json (the files beside a record, such as
    <name>.tasks.json, are not clusters)."""
    if not os.path.isdir(CLUSTERS):
        return []
    return sorted(fn[:-5] for fn in os.listdir(CLUSTERS) if fn.endswith(".json") and CLUSTER_NAME.fullmatch(fn[:-5]))


def list_clusters():
    out = []
    for name in _recorded():
        try:
            out.append(inspect(name))
        except NotFound:
            continue  # removed meanwhile, or a record that does not read (set aside)
    return out


def node_update(name, node, availability):
    """`docker node update --availability`: active (takes tasks), pause (keeps its tasks, takes no new ones),
    drain (its tasks move to other nodes at the manager's next step)."""
    from ..wire.orchestration import AVAILABILITIES
    if availability not in AVAILABILITIES:
        raise InvalidSpec(f"availability {availability!r} is not known", fix="use " + ", ".join(AVAILABILITIES))
    with locked(name):
        st = _load(name)
        entry = next((n for n in st["nodes"] if n["name"] == node), None)
        if entry is None:
            raise NotFound(f"cluster {name} has no node {node!r}",
                           fix="its nodes: " + ", ".join(n["name"] for n in st["nodes"]))
        entry["availability"] = availability
        write_json(_path(name), st)
    return {"node": node, "availability": availability}


def manage(name):
    """Start the cluster's manager, its control loop (:mod:`labkit.agent.manager`), as a process of its own
    recorded in the cluster's state; its pid. Without it, the loop turns only when asked (``manager.step``)."""
    with locked(name):
        st = _load(name)
        if recorded_process(st.get("manager") or {}):
            return {"pid": st["manager"]["pid"], "existed": True}
        with open(file(name, "manager.log"), "ab") as log:
            proc = start_helper("manager", "run", name, stderr=log)
        st["manager"] = pid_fields(proc.pid)
        write_json(_path(name), st)
    return {"pid": proc.pid, "existed": False}


def unmanage(name):
    """Stop the cluster's manager (its tasks run on, as a Swarm's do when its managers are gone)."""
    st = _load(name)
    pid = recorded_process(st.get("manager") or {})
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while recorded_process(st["manager"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        if recorded_process(st["manager"]):
            os.kill(pid, signal.SIGKILL)
    with locked(name):  # (not held while the manager stops: its step may be waiting for it)
        st = _load(name)
        st["manager"] = None
        write_json(_path(name), st)
    return {"stopped": bool(pid)}


def remove(name):
    """Its manager, every node (and with each, all it ran), the routes, the mesh, the cluster's network, its
    records."""
    st = _load(name)
    spec = ClusterSpec.from_dict(st["spec"])
    rec = Recorder(f"remove cluster {name}")
    unmanage(name)
    st = _load(name)
    from . import manager
    for n in reversed(st.get("nodes") or []):
        if n.get("machine"):  # a machine goes on: the cluster's containers and network on it go first
            _clear_machine(name, n, manager, rec)
        try:
            rec.steps += node.remove(n["id"])["steps"]
        except NotFound:
            pass
    for spec_node in spec.node_names():  # a node made before its entry was written (a create cut short)
        try:
            rec.steps += node.remove(f"{name}-{spec_node}")["steps"]
        except NotFound:
            pass
    for subnet in st.get("routes") or []:
        run(["ip", "route", "delete", str(ipaddress.ip_network(subnet))], recorder=rec, check=False)
    manager.remove_mesh(name, rec)
    try:
        rec.steps += network.remove(spec.network)["steps"]
    except NotFound:
        pass
    with locked(name):  # (a request waiting for the lock finds no cluster after it)
        for part in FILES:
            if part != "lock" and os.path.exists(file(name, part)):
                os.unlink(file(name, part))
        os.unlink(_path(name))
    os.unlink(file(name, "lock"))
    return rec.to_dict(name=name)


def _clear_machine(name, n, manager, rec):
    """On a machine node that answers: the containers of the cluster's tasks recorded on it, and its task
    network (a machine that does not answer lost them with its power, or keeps them for `labkit cleanup` there)."""
    try:
        for ref in manager.task_containers(name, n["name"]) + ([None] if n.get("tasks_made") else []):
            try:
                if ref is None:
                    node.call(n["id"], "net.remove", {"name": TASKS}, timeout=60)
                else:
                    node.call(n["id"], "container.rm", {"ref": ref, "force": True}, timeout=60)
                    rec.fact(f"container {ref} on {n['name']}", "removed")
            except NotFound:
                continue  # (a task's container the manager removed already)
            except TransportError:
                raise
            except LabkitError as exc:
                rec.fact(f"{ref or TASKS} on {n['name']}", f"not removed: {exc}")
    except TransportError as exc:
        rec.fact(f"machine {n['machine']}", f"not cleared (down?): {exc}")


def cleanup(rec):
    """``labkit cleanup``'s part: every recorded cluster removed (its nodes, routes and network)."""
    for name in _recorded():
        try:
            rec.steps += remove(name)["steps"]
        except LabkitError as exc:
            rec.fact(f"cluster {name}", str(exc))
