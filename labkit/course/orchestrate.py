"""Lab 09's helpers on the client side: a cluster's state as tables, a control loop's two halves, a load on a
published port, a timeline of where the tasks run, and the evidence the Kubernetes table is built from.

Everything here is a request to the agent (``lab.call``, ``lab.run``) or pure bookkeeping; the control loop's
own logic lives in :mod:`labkit.wire.orchestration` (the library's) and in the student's notebook (theirs).
A node's id is ``<cluster>-<node>`` (``lab9-worker1``). Requests to a published port are made **on the
target** (``lab.run`` or a process spawned there), so the figures are the same whether the notebook runs on
the target or drives it over SSH. pandas loads lazily (host side only).
"""
import dataclasses
import json
import secrets
import time

from ..wire.errors import LabkitError, NotFound
from ..wire.orchestration import Action, HealthCheck, Node, ServiceSpec, Task

#: a web server that answers with its own hostname (a task's container id): who answered is who served
WEB_CMD = ("sh", "-c", "mkdir -p /tmp/w && hostname > /tmp/w/index.html && exec httpd -f -p 80 -h /tmp/w")
#: lab 09's health check: healthy while the image has no /broken (the broken image of section 7 has one)
WEB_HEALTH = HealthCheck(cmd=("sh", "-c", "test ! -e /broken"), interval=0.5, retries=2)

#: a bounded load on the target: one GET after another (at most RATE a second), one JSON line each:
#: [time, ok, body or error]; it ends by itself after its seconds
LOAD = ("import http.client, json, sys, time\n"
        "host, port, seconds, rate, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), "
        "float(sys.argv[5])\n"
        "end = time.time() + seconds\n"
        "while time.time() < end:\n"
        "    t = time.time()\n"
        "    conn = http.client.HTTPConnection(host, port, timeout=limit)\n"
        "    try:\n"
        "        conn.request('GET', '/')\n"
        "        res = conn.getresponse()\n"
        "        line = [t, res.status == 200, res.read().decode(errors='replace').strip()[:64]]\n"
        "    except Exception as exc:\n"
        "        line = [t, False, type(exc).__name__]\n"
        "    finally:\n"
        "        conn.close()\n"
        "    print(json.dumps(line), flush=True)\n"
        "    time.sleep(max(0.0, 1.0 / rate - (time.time() - t)))\n")


def node_id(cluster, node):
    """A node's id, as node.* calls take it: ``<cluster>-<node>``."""
    return f"{cluster}-{node}"


def _df(rows, columns=None):
    import pandas as pd
    return pd.DataFrame(rows, columns=columns)


# -- the cluster ---------------------------------------------------------------------------------------------

def exists(lab, cluster):
    """Whether the target has cluster ``cluster``."""
    return any(c["name"] == cluster for c in lab.call("cluster.list"))


def remove(lab, cluster):
    """Remove the cluster when it exists (its manager, nodes, network, mesh); whether there was one."""
    if not exists(lab, cluster):
        return False
    lab.call("cluster.remove", name=cluster)
    return True


def nodes_table(lab, cluster):
    """``docker node ls``: each node's role, address, task subnet, availability and status."""
    info = lab.call("cluster.inspect", name=cluster)
    return _df([{"node": n["name"], "id": n["id"], "role": n["role"], "address": n["ip"], "task subnet": n["tasks"],
                 "availability": n["availability"], "status": n["status"]} for n in info["nodes"]]).set_index("node")


def live_nodes(lab, cluster):
    """The nodes whose engine answers now ({name: address}), in the cluster's order."""
    return {n["name"]: n["ip"] for n in lab.call("cluster.inspect", name=cluster)["nodes"] if n["status"] == "ready"}


MACHINE = "hostname; uname -r; cat /proc/sys/kernel/random/boot_id; cat /proc/1/comm; " \
          "ip -o -4 addr show scope global | awk '{print $4}' | tr '\\n' ' '"


def machines(lab, cluster):
    """What the host and each node say about themselves, asked inside each: hostname, kernel, boot id, PID 1
    and addresses. The same program runs in every node (``node.call`` ... ``run``) and on the host."""
    rows = []
    for name, ask in [("host", lambda argv: lab.run(argv))] + [
            (n["name"], lambda argv, n=n: lab.call("node.call", node_id=n["id"], op="run", params={"argv": argv}))
            for n in lab.call("cluster.inspect", name=cluster)["nodes"] if n["status"] == "ready"]:
        out = ask(["sh", "-c", MACHINE])
        lines = (out.get("stdout") or "").splitlines() + [""] * 5
        rows.append({"machine": name, "hostname": lines[0], "kernel (uname -r)": lines[1], "boot id": lines[2],
                     "PID 1": lines[3], "addresses": lines[4].strip()})
    return _df(rows).set_index("machine")


# -- the pure cases of sections 2 and 3 ------------------------------------------------------------------------

def node(name, status="ready", availability="active", role=None):
    """A node as a plain dict (a case for the scheduler)."""
    return Node(name, role or ("manager" if name == "manager" else "worker"), availability, status).to_dict()


def task(id, service, slot, node, state="running", desired="running", image="busybox:latest", since=0.0):
    """A task as a plain dict (a case for the scheduler or the reconcile step)."""
    return Task(id, service, slot, node, image, desired, state, since=since).to_dict()


def service(name, replicas, image="busybox:latest"):
    """A service's desired state as a plain dict."""
    return ServiceSpec(name=name, image=image, replicas=replicas).to_dict()


def spread_args(case):
    """A scheduler case's (service name, nodes, tasks) as the objects a scheduler is given."""
    return case["service"], [Node.from_dict(n) for n in case["nodes"]], [Task.from_dict(t) for t in case["tasks"]]


class Ids:
    """``new_id()`` for the pure cases: new1, new2, ... (the live cluster's ids are :func:`new_id`'s)."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1
        return f"new{self.n}"


def reconcile_args(case):
    """A reconcile case's (services, nodes, tasks, now, new_id) as a reconcile step is given them."""
    services = {k: ServiceSpec.from_dict(v) for k, v in case["services"].items()}
    return (services, [Node.from_dict(n) for n in case["nodes"]], [Task.from_dict(t) for t in case["tasks"]],
            float(case.get("now", 100.0)), Ids())


def summary(actions):
    """Actions as plain rows, in order: what a start places where, what a stop or mark changes. A start's
    new task is named by its service and slot (ids are the caller's); a stop's or mark's by its id."""
    rows = []
    for a in actions or ():
        if not isinstance(a, Action):
            raise TypeError(f"expected Action objects, got {type(a).__name__}: build them with Action(kind, task, "
                            "node, reason)")
        t = a.task
        row = {"kind": a.kind, "service": t.service, "slot": t.slot, "node": t.node if a.kind == "start" else None,
               "task": None if a.kind == "start" else t.id, "desired": t.desired, "state": t.state}
        rows.append(row)
    return rows


def _node_text(n):
    extra = [x for x in (n["status"] if n["status"] != "ready" else "", n["availability"]
                         if n["availability"] != "active" else "") if x]
    return n["name"] + (f" ({', '.join(extra)})" if extra else "")


def _task_text(t):
    state = t["state"] if t["desired"] == "running" else f"{t['state']}, desired {t['desired']}"
    return f"{t['id']}: {t['service']}.{t['slot']} on {t['node']}" + ("" if state == "running" else f" ({state})")


def cases_table(cases):
    """The cases, one row each, in words: the nodes (with their status and availability when not ready and
    active), the tasks on record (with their state when not running), and the services wanted if any."""
    rows = []
    for c in cases:
        row = {"case": c["title"]}
        if "service" in c:
            row["a new task of"] = c["service"]
        if "services" in c:
            row["services wanted"] = ", ".join(f"{k} x{v['replicas']}" for k, v in sorted(c["services"].items()))
        row["nodes"] = ", ".join(_node_text(n) for n in c["nodes"])
        row["tasks on record"] = "; ".join(_task_text(t) for t in c["tasks"]) or "none"
        rows.append(row)
    return _df(rows).set_index("case")


def actions_text(rows):
    """A step's actions (:func:`summary`'s rows) in words, one per line."""
    words = {"start": "start {service}.{slot} on {node}", "stop": "stop {task} ({service}.{slot})",
             "mark": "mark {task} ({service}.{slot}) {state}"}
    return "\n".join(words[r["kind"]].format(**r) for r in rows) or "(nothing to do)"


# -- a control loop of one's own: its two halves ----------------------------------------------------------------

@dataclasses.dataclass
class Observed:
    """One look at the cluster (``manager.observe``): what a reconcile step is given."""
    services: dict
    nodes: list
    tasks: list
    now: float
    paused: list

    def running(self, service=None):
        """The tasks that run (desired running, state running), of ``service`` or of all."""
        return [t for t in self.tasks if t.live and t.state == "running" and (service is None or t.service == service)]


def observe(lab, cluster):
    """The first half of a turn of the loop: the nodes as their heartbeat found them, the tasks as their
    containers left them (nothing started or stopped), as :class:`Observed`."""
    seen = lab.call("manager.observe", name=cluster)
    return Observed({k: ServiceSpec.from_dict(v) for k, v in seen["services"].items()},
                    [Node.from_dict(n) for n in seen["nodes"]], [Task.from_dict(t) for t in seen["tasks"]],
                    seen["now"], seen.get("paused", []))


def act(lab, cluster, actions):
    """The second half: carry ``actions`` out on the cluster (and write the routing mesh); its record."""
    return lab.call("manager.act", name=cluster, actions=[a.to_dict() for a in actions])


def new_id():
    """A fresh task id, as the manager makes them (and as ``manager.act`` accepts a new task's)."""
    return secrets.token_hex(5)


def tasks_table(lab, cluster, service=None, live=False):
    """``docker service ps``: the tasks on record (``live``: only those that hold their slot)."""
    rows = [t for t in lab.call("service.ps", name=cluster, service=service)
            if not live or (t["desired"] == "running" and t["state"] in ("new", "assigned", "starting", "running"))]
    cols = ["service", "slot", "id", "node", "image", "desired", "state", "error"]
    return _df([{k: t.get(k) for k in cols} for t in rows], cols)


def running(lab, cluster, service):
    """The running tasks of ``service`` (desired running, state running), as dicts."""
    return [t for t in lab.call("service.ps", name=cluster, service=service)
            if t["desired"] == "running" and t["state"] == "running"]


def per_node(lab, cluster, service, nodes=None):
    """How many running tasks of ``service`` each node has ({node: count}; every node of the cluster listed)."""
    names = nodes or [n["name"] for n in lab.call("cluster.inspect", name=cluster)["nodes"]]
    out = dict.fromkeys(names, 0)
    for t in running(lab, cluster, service):
        out[t["node"]] = out.get(t["node"], 0) + 1
    return out


def wait_running(lab, cluster, service, count, seconds=20, every=0.1, away_from=None):
    """Wait (bounded) until ``service`` has ``count`` running tasks, none on node ``away_from``; whether it did."""
    deadline = time.monotonic() + seconds
    while True:
        tasks = running(lab, cluster, service)
        if len(tasks) == count and all(t["node"] != away_from for t in tasks):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(every)


# -- load on a published port, and a timeline of the tasks ---------------------------------------------------

def clock_offset(lab):
    """The target's clock minus this one's, in seconds (0 within a millisecond or two when they are one)."""
    before = time.time()
    out = lab.run(["python3", "-c", "import time; print(repr(time.time()))"]).stdout
    after = time.time()
    return float(out) - (before + after) / 2


class Load:
    """Requests to ``host:port`` on the target, one after another, at most ``rate`` a second for ``seconds``,
    each with a time limit of ``limit`` seconds: a process of its own there (started by :meth:`start`), so
    that this notebook's connection stays free meanwhile. :meth:`result` waits for its end and gives every
    request as a row (t on this machine's clock, ok, what answered or the error)."""

    def __init__(self, lab, port, host="127.0.0.1", seconds=4.0, rate=100, limit=0.3):
        self.lab, self.port, self.host = lab, int(port), host
        self.seconds, self.rate, self.limit = float(seconds), min(float(rate), 100.0), float(limit)
        self.proc, self.offset = None, 0.0

    def start(self):
        self.offset = clock_offset(self.lab)
        self.proc = self.lab.spawn(["python3", "-c", LOAD, self.host, str(self.port), str(self.seconds),
                                    str(self.rate), str(self.limit)])
        return self

    def result(self, wait=True):
        """Wait for the load to end (bounded; ``wait=False``: end it now), read its lines, remove its process
        entry; a DataFrame."""
        if self.proc is None:
            return _df([], ["t", "ok", "answer"])
        deadline = time.monotonic() + (self.seconds + 10 if wait else 0)
        info = self.proc.inspect()
        while info.get("alive") and time.monotonic() < deadline:
            time.sleep(0.1)
            info = self.proc.inspect()
        text = self.lab.read_file(info["log"])["text"] if info.get("log") else ""
        self.proc.stop(timeout=0)
        rows = []
        for line in text.splitlines():
            try:
                t, ok, answer = json.loads(line)
            except (ValueError, TypeError):
                continue
            rows.append({"t": float(t) - self.offset, "ok": bool(ok), "answer": str(answer)})
        self.proc = None
        return _df(rows, ["t", "ok", "answer"])


@dataclasses.dataclass
class Timeline:
    """Where a service's tasks ran over time: ``samples`` (t, and a column per node: its running tasks),
    ``events`` ([(t, label)]), ``requests`` (a :class:`Load`'s rows, or None); times are seconds on this
    machine's clock, and :attr:`t0` (the first event's) is where the chart and :meth:`recovered` count from."""
    service: str
    replicas: int
    samples: object
    events: list
    requests: object = None

    @property
    def t0(self):
        return self.events[0][0] if self.events else (self.samples["t"].iloc[0] if len(self.samples) else 0.0)

    def recovered(self, away_from=None):
        """Seconds from the first event to the first sample with ``replicas`` running tasks and none on
        ``away_from``; None when that never happened while we watched."""
        nodes = [c for c in self.samples.columns if c != "t"]
        for _, row in self.samples.iterrows():
            if row["t"] < self.t0:
                continue
            if sum(row[n] for n in nodes) == self.replicas and (away_from is None or row.get(away_from, 0) == 0):
                return float(row["t"] - self.t0)
        return None

    def failed(self):
        """(failed, total) requests made while we watched."""
        if self.requests is None or not len(self.requests) or not len(self.samples):
            return 0, 0
        r = self.requests
        r = r[(r["t"] >= self.samples["t"].min()) & (r["t"] <= self.samples["t"].max())]
        return int((~r["ok"]).sum()), int(len(r))

    def chart(self, away_from=None, title=None, subtitle=""):
        from . import plotting
        return plotting.recovery_chart(self, away_from=away_from, title=title, subtitle=subtitle)


def watch(lab, cluster, service, seconds=4.0, every=0.05, events=(), load=None):
    """Sample where ``service``'s tasks run every ``every`` seconds for ``seconds`` (``service.ps``, one request
    each); ``events``: [(at, label, fn)]: ``fn()`` called ``at`` seconds in (e.g. a node's power cut); ``load``:
    a :class:`Load` started first and read back at the end. A :class:`Timeline`."""
    nodes = [n["name"] for n in lab.call("cluster.inspect", name=cluster)["nodes"]]
    replicas = _replicas(lab, cluster, service)
    if load is not None:
        load.start()
    todo = sorted(events, key=lambda e: e[0])
    rows, happened = [], []
    start = time.time()
    try:
        while time.time() - start < seconds:
            now = time.time()
            while todo and now - start >= todo[0][0]:
                _, label, fn = todo.pop(0)
                happened.append((time.time(), label))
                fn()
            rows.append({"t": time.time(), **per_node(lab, cluster, service, nodes)})
            time.sleep(max(0.0, every - (time.time() - now)))
    finally:
        requests = load.result() if load is not None else None
    return Timeline(service, replicas, _df(rows, ["t"] + nodes), happened, requests)


# -- the routing mesh ---------------------------------------------------------------------------------------

def fetch(lab, url, limit=1.0):
    """One GET of ``url`` made on the target; the page's text (stripped), or None when nothing answered."""
    return fetch_many(lab, [url], limit)[0]


#: GETs one after another, each with a short time limit, on the target (python3 is there: the agent runs on it)
FETCH_MANY = ("import json, sys, urllib.request\n"
              "out = []\n"
              "for url in sys.argv[2:]:\n"
              "    try:\n"
              "        out.append(urllib.request.urlopen(url, timeout=float(sys.argv[1])).read().decode().strip())\n"
              "    except Exception:\n"
              "        out.append(None)\n"
              "print(json.dumps(out))\n")


def fetch_many(lab, urls, limit=1.0):
    """One GET of each of ``urls``, one after another, all made on the target by one program; the pages'
    texts (stripped), None where nothing answered within ``limit`` seconds."""
    urls = [str(u) for u in urls]
    res = lab.run(["python3", "-c", FETCH_MANY, str(limit)] + urls, timeout=len(urls) * (limit + 1) + 30)
    try:
        got = json.loads(res.stdout)
    except ValueError:
        return [None] * len(urls)
    return got if isinstance(got, list) and len(got) == len(urls) else [None] * len(urls)


def who(lab, cluster):
    """Every container on the cluster's live nodes by id, as its hostname says it: {id: (node, name)}."""
    out = {}
    for n in lab.call("cluster.inspect", name=cluster)["nodes"]:
        if n["status"] != "ready":
            continue
        try:
            for c in lab.call("node.call", node_id=n["id"], op="container.ps", params={"all": True}):
                out[c["id"][:12]] = (n["name"], c["name"])
        except LabkitError:
            continue  # a node that went down meanwhile
    return out


def mesh_rules(lab, cluster):
    """The routing mesh's nftables table on the host (``nft list table ip labkit_mesh_<cluster>``)."""
    res = lab.run(["nft", "list", "table", "ip", f"labkit_mesh_{cluster}"])
    return res.stdout if res.exit_code == 0 else f"(no mesh table: {res.stderr.strip()})"


# -- stacks --------------------------------------------------------------------------------------------------

def exec_in(lab, cluster, service, argv, on=None, avoid=None, timeout=10):
    """Run ``argv`` in a running task of ``service`` (on node ``on``, or not on ``avoid``, when given): the
    task it ran in and the exec's answer (exit_code, stdout, stderr). NotFound when no such task runs."""
    for t in running(lab, cluster, service):
        if (on is None or t["node"] == on) and t["node"] != avoid:
            res = lab.call("node.call", node_id=node_id(cluster, t["node"]), op="container.exec",
                           params={"ref": t["container"], "argv": list(argv), "timeout": timeout})
            return t, res
    raise NotFound(f"no running task of {service} in cluster {cluster}" + (f" on {on}" if on else ""),
                   fix="see service ps; wait until it runs")


def ask_by_name(lab, cluster, client_service, name, on=None, limit=1):
    """From inside a running task of ``client_service``: ``wget http://NAME/`` (a service's name, which resolves
    to its virtual address); (ok, the page or the error)."""
    try:
        # (busybox's own -T crashes in Debian 12's busybox 1.35: its timeout applet bounds the request instead)
        _, res = exec_in(lab, cluster, client_service, ["timeout", str(limit), "wget", "-q", "-O-", f"http://{name}/"],
                         on=on, timeout=limit + 5)
    except LabkitError as exc:
        return False, str(exc)
    if res["exit_code"] == 0:
        return True, res["stdout"].strip()
    if res["exit_code"] == 143:  # timeout's own TERM
        return False, f"no answer within {limit} s"
    return False, (res.get("stderr") or f"exit {res['exit_code']}").strip()


def wait_stack(lab, cluster, stack, seconds=20, every=0.1):
    """Wait (bounded) until every service of ``stack`` runs all its replicas; whether they did."""
    deadline = time.monotonic() + seconds
    while True:
        rows = [s for s in lab.call("service.ls", name=cluster) if s["name"].startswith(stack + "_")]
        if rows and all(s["running"] == s["replicas"] for s in rows):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(every)


def hang(lab, cluster, node, service, client, name, asker, load=None, seconds=4.0, most=15.0, every=0.2):
    """Freeze ``node`` (``node.pause``: a hung machine) and, from inside a task of ``client`` on node ``asker``,
    ask ``http://NAME/`` every ``every`` seconds, until ``service`` runs all its replicas off ``node`` and a
    request by name got through after that (for ``seconds`` at least, ``most`` at most); then thaw the node
    (``node.resume``). ``load``: a :class:`Load` started first (on a published port) and read back at the end.
    (probes: a DataFrame of t, answered, with, and the service's running tasks per node; the load's requests)."""
    if load is not None:
        load.start()
    start, rows, healed = time.time(), [], None
    lab.call("node.pause", node_id=node_id(cluster, node))
    try:
        while time.time() - start < most:
            asked = time.time()
            ok, said = ask_by_name(lab, cluster, client, name, on=asker)
            counts = per_node(lab, cluster, service)
            rows.append({"t (s)": round(time.time() - start, 2), "answered": ok, "with": said,
                         **{f"{service} on {k}": v for k, v in counts.items()}})
            if healed is None and counts.get(node, 0) == 0 and sum(counts.values()) == _replicas(lab, cluster, service):
                healed = time.time()
            if healed is not None and ok and asked >= healed and time.time() - start >= seconds:
                break
            time.sleep(every)
    finally:
        lab.call("node.resume", node_id=node_id(cluster, node))
        requests = load.result(wait=False) if load is not None else None
    return _df(rows).set_index("t (s)"), requests


def _replicas(lab, cluster, service):
    return next((s["replicas"] for s in lab.call("service.ls", name=cluster) if s["name"] == service), 0)


# -- rolling updates -----------------------------------------------------------------------------------------

def watch_update(lab, cluster, service, until, seconds=30, every=0.1):
    """Sample a rolling update until its state is one of ``until`` (bounded by ``seconds``): each sample's
    running tasks by slot with their image, and the update's state. (DataFrame of samples, last inspect)."""
    rows, start, info = [], time.time(), None
    while True:
        now = time.time()
        info = lab.call("service.inspect", name=cluster, service=service)
        state = (info.get("update") or {}).get("state")
        for t in lab.call("service.ps", name=cluster, service=service):
            if t["desired"] == "running" and t["state"] in ("starting", "running"):
                rows.append({"t": now - start, "slot": t["slot"], "image": t["image"], "state": t["state"],
                             "node": t["node"], "update": state})
        if state in until or now - start > seconds:
            break
        time.sleep(max(0.0, every - (time.time() - now)))
    return _df(rows, ["t", "slot", "image", "state", "node", "update"]), info


# -- the Kubernetes mapping ------------------------------------------------------------------------------------

def kubernetes_evidence(lab, cluster, service, stack=None, healed=None):
    """What this run shows for each Kubernetes object: rows (Kubernetes, Swarm / labkit, evidence from here).
    ``stack``: a stack of the cluster to name; ``healed``: the seconds a node's death took to heal (section 4)."""
    info = lab.call("cluster.inspect", name=cluster)
    svc = lab.call("service.inspect", name=cluster, service=service)
    spec = svc["spec"]
    tasks = running(lab, cluster, service)
    pod = tasks[0] if tasks else None
    engine = {}
    if pod:
        engine = lab.call("node.call", node_id=node_id(cluster, pod["node"]), op="container.inspect",
                          params={"ref": pod["container"]})
    ports = ", ".join(f"{p['published']}->{p['target']}" for p in spec.get("ports", [])) or "none"
    nodes = ", ".join(f"{n['name']} {n['ip']} ({n['status']})" for n in info["nodes"])
    engines = []
    for n in info["nodes"]:
        st = lab.call("node.inspect", node_id=n["id"])
        if st["status"] == "ready":
            engines.append(f"{n['name']} (its PID 1 is the host's PID {st['pid']})")
    manager = info.get("manager")
    loop = "not running"
    if manager:
        cmd = lab.read_file(f"/proc/{int(manager)}/cmdline")["text"].replace("\0", " ").strip()
        loop = f"PID {manager} ({cmd or 'gone'})"
    records = sorted(e for e in lab.list_dir("/run/labkit/clusters").get("entries", []) if e.startswith(cluster + "."))
    members = [s["name"] for s in lab.call("service.ls", name=cluster) if stack and s["name"].startswith(stack + "_")]
    rows = [
        ("Pod", "task (one container)",
         f"task {pod['id']} = container {engine.get('Id', '?')[:12]} ({pod['container']}) on {pod['node']}, "
         f"address {(engine.get('NetworkSettings') or {}).get('IPAddress', '?')}" if pod else "no task runs"),
        ("Deployment / ReplicaSet", "service with replicas",
         f"service {service}: {spec['replicas']} replicas desired, {svc['running']} running, image {spec['image']}"),
        ("Service (ClusterIP)", "the service's virtual address",
         f"{svc.get('vip')}, DNATed by every node to the running tasks; services that share a network resolve "
         "each other's names to theirs (section 6: api)"),
        ("Service (NodePort)", "a port published on the routing mesh",
         f"port {ports} answers on 127.0.0.1 and on every live node's address"),
        ("kubectl apply -f (a set of manifests, a Helm chart)", "stack (a Compose file)",
         f"stack {stack}: {', '.join(members)}" if members else "no stack deployed"),
        ("Node", "node", nodes),
        ("control plane (controller manager, scheduler)", "the manager's loop",
         f"{loop}: observe, reconcile, act every 0.1 s; a node silent for 0.5 s is down"
         + (f"; here a dead node's task ran again {healed:.2f} s after the power cut" if healed is not None else "")),
        ("etcd (the cluster's state)", "the manager's records", ", ".join(records) + " in /run/labkit/clusters"),
        ("kubelet + container runtime", "each node's engine",
         "an engine answers in " + ", ".join(engines) if engines else "no node answers"),
        ("readiness / liveness probe", "health check",
         " ".join(spec["health"]["cmd"]) + f", every {spec['health']['interval']:g} s"
         if spec.get("health") else "none"),
        ("rolling update / rollout undo", "service update / rollback",
         f"last update: {(svc.get('update') or {}).get('state') or 'none'}; previous image "
         f"{(svc.get('previous') or {}).get('image', '-')}"),
    ]
    return _df(rows, ["Kubernetes", "Swarm (labkit)", "this run"]).set_index("Kubernetes")
