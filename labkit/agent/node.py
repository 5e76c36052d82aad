"""Nodes: the "machines" of a cluster on one host, each made of namespaces, a cgroup subtree and labkit's engine.

A node is a process started by the process mechanism (:mod:`labkit.agent.process`) in new UTS, PID, mount,
IPC, network and cgroup namespaces, in a cgroup of its own (``labkit/node-<cluster>-<name>``) and on the
cluster's network (a labkit bridge network on the host). Its PID 1 is this module's :func:`init`, which gives
the node what a machine has of its own: /run/labkit (a tmpfs: its engine's live state, its supervisor), a
container store (/var/lib/labkit/nodes/<id>/containers and names, bound over the host's), a /sys for its
network namespace and cgroup mounts whose root is the node's cgroup (its cgroup namespace), so that every
container it runs is a cgroup below the node's. Then it runs labkit's daemon, the node's engine, which the
host reaches at /proc/<node pid>/root/run/labkit/labkitd.sock (and Docker's Engine API beside it). Images and
layers stay the host's, read by every node as a shared registry cache would be.

Killing a node (:func:`kill`) kills its cgroup subtree at once: its PID 1, its daemon and supervisor, every
container. Its namespaces, mounts and veths go with its last process, as a machine's go with its power.
:func:`remove` then gives back its address, cgroups and store. State: /run/labkit/nodes/<id>.json, written
before anything is made, so that ``labkit cleanup`` finds whatever a failed start left. Standard library only.
"""
import os
import re
import shutil
import signal
import socket
import sys
import time

from ..wire import protocol
from ..wire.channel import Channel
from ..wire.errors import Conflict, InvalidSpec, LabkitError, MechanismError, NotFound, TransportError
from ..wire.specs import CONTAINERS_DIR, RUN_DIR, STATE_DIR, CgroupSpec, NodeSpec, ProcessSpec
from .engine import NAMES
from . import cgroups, kernel, machine, process
from .runner import Recorder, env_for_children, read_text, recorded_process
from .state import private_dir, read_dir, read_json, write_json

NODES_RUN = RUN_DIR + "/nodes"     # <id>.json: what was made for each node
NODES_DIR = STATE_DIR + "/nodes"   # <id>/containers, <id>/names: each node's own container store
OWN_DIRS = {"containers": CONTAINERS_DIR, "names": NAMES}  # bound over the host's, in the node
NAMESPACES = ("uts", "pid", "mnt", "ipc", "net", "cgroup")
ID_RE = re.compile(r"[a-z0-9]{1,6}-[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?")
START_TIMEOUT = 30


def _check_id(node_id):
    if not isinstance(node_id, str) or not ID_RE.fullmatch(node_id):
        raise NotFound(f"no such node: {node_id!r}", fix="nodes are named <cluster>-<name>; see lab.nodes()")
    return node_id


def _state_path(node_id):
    return f"{NODES_RUN}/{node_id}.json"


def _name(node_id):
    return f"node-{node_id}"  # its cgroup and its process entry


def daemon_socket(pid):
    """The node's engine, seen from the host: its daemon's socket in the node's own /run/labkit."""
    return f"/proc/{int(pid)}/root{RUN_DIR}/labkitd.sock"


def _python():
    """The host's Python for the node's PID 1 (a node is a machine with the host's root, not a container)."""
    exe = os.path.realpath(sys.executable)
    return exe if os.path.isfile(exe) else "/usr/bin/python3"


def _own_engine(pid):
    """Whether the node's /run/labkit is its own (its tmpfs, mounted by its PID 1) and not yet the host's:
    until it is, the node's socket path leads to the host's daemon, where the host runs one."""
    try:
        return os.stat(f"/proc/{int(pid)}/root{RUN_DIR}").st_dev != os.stat(RUN_DIR).st_dev
    except OSError:
        return False


def _answers(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _load(node_id):
    st = read_json(_state_path(_check_id(node_id)), default=None)
    if not isinstance(st, dict) or st.get("id") != node_id:
        raise NotFound(f"no such node: {node_id}", fix="see lab.nodes()")
    return st


def create(spec: NodeSpec):
    """Start node ``spec``: its cgroup, its namespaces and PID 1 on the cluster network, its engine answering.
    A node on a machine of its own (``spec.machine``) is recorded once its agent answers there."""
    rec = Recorder(f"create node {spec.id}")
    private_dir(NODES_RUN)
    path = _state_path(spec.id)
    old = read_json(path, default=None)
    if isinstance(old, dict):
        raise Conflict(f"node {spec.id} exists", fix=f"remove it first: lab.call('node.remove', node={spec.id!r})")
    if spec.machine:
        said = machine.call(spec.machine, "machine.hello", timeout=machine.HELLO_TIMEOUT)
        if not said.get("worker"):
            raise InvalidSpec(f"machine {spec.machine} ({said.get('hostname')}) is not provisioned as a cluster worker",
                              fix="bring it up with the multi-machine Vagrantfile (LABKIT_VM_NODES=3 vagrant up), "
                                  "which runs provision.sh --worker there")
        if said.get("clusters"):
            raise Conflict(f"machine {spec.machine} ({said.get('hostname')}) is a node of cluster "
                           f"{said['clusters'][0]} already", fix="remove that cluster first, or name another machine")
        write_json(path, {"id": spec.id, "spec": spec.to_dict(), "created": time.time(), "pid": None,
                          "machine": spec.machine, "ip": spec.machine, "boot_id": said.get("boot_id")})
        rec.fact("machine", spec.machine)
        rec.fact("hostname", said.get("hostname"))
        return rec.to_dict(id=spec.id)
    write_json(path, {"id": spec.id, "spec": spec.to_dict(), "created": time.time(), "pid": None})
    try:
        for sub in OWN_DIRS:
            os.makedirs(f"{NODES_DIR}/{spec.id}/{sub}", mode=0o700, exist_ok=True)
        rec.steps += cgroups.create(CgroupSpec(name=_name(spec.id)))["steps"]
        pspec = ProcessSpec(argv=(_python(), "-m", __name__, "init", spec.id), namespaces=NAMESPACES,
                            hostname=spec.name, cgroup=_name(spec.id), network=spec.network, ip=spec.ip,
                            env=tuple(sorted(env_for_children().items())), mount_proc=True, look=False)
        started = process.start(pspec, name=_name(spec.id))
        rec.steps += started["steps"]
        pid = started["facts"]["pid"]
        ip = (started["facts"].get("net") or {}).get("ip")
        st = read_json(f"{process.PROCS_DIR}/{_name(spec.id)}.json")
        write_json(path, {"id": spec.id, "spec": spec.to_dict(), "created": time.time(), "pid": pid,
                          "starttime": st.get("starttime"), "ip": ip})
        deadline = time.monotonic() + START_TIMEOUT
        while not (_own_engine(pid) and _answers(daemon_socket(pid))):
            if time.monotonic() > deadline or not recorded_process(st):
                log = read_text(process._log_path(_name(spec.id)), "")[-2000:]
                raise MechanismError(f"node {spec.id}'s engine did not answer within {START_TIMEOUT} s",
                                     fix=f"its PID 1 said: {log.strip() or 'nothing'}")
            time.sleep(0.02)
    except BaseException:
        try:
            remove(spec.id)
        except LabkitError:
            pass
        raise
    rec.fact("pid", pid)
    rec.fact("ip", ip)
    rec.fact("socket", daemon_socket(pid))
    return rec.to_dict(id=spec.id)


def pid_of(node_id):
    """The host PID of the node's PID 1, as recorded (whether it still lives is :func:`inspect`'s question)."""
    return _load(node_id).get("pid")


def inspect(node_id):
    """A node's record: its spec, PID 1, address, and status: "ready" (its engine answers), "down" (its PID 1
    is gone: killed), "paused" (frozen: a hung machine) or "unreachable" (alive, not answering). A node on a
    machine of its own is "ready" while its agent answers (``rebooted`` when its kernel's boot id changed: what
    ran there is gone) and "down" when it does not."""
    st = _load(node_id)
    if st.get("machine"):
        try:
            said = machine.call(st["machine"], "machine.hello", timeout=15)
            status, rebooted = "ready", said.get("boot_id") != st.get("boot_id")
        except TransportError:
            status, rebooted = "down", None
        return {**{k: st.get(k) for k in ("id", "spec", "pid", "ip", "created", "machine")}, "status": status,
                "rebooted": rebooted, "socket": None}
    alive = bool(st.get("pid")) and recorded_process(st)
    try:
        paused = alive and cgroups.is_frozen(_name(node_id))
    except NotFound:
        paused = False
    status = "down" if not alive else "paused" if paused else \
        "ready" if _own_engine(st["pid"]) and _answers(daemon_socket(st["pid"])) else "unreachable"
    return {**{k: st.get(k) for k in ("id", "spec", "pid", "ip", "created")}, "status": status,
            "socket": daemon_socket(st["pid"]) if alive else None}


def list_nodes():
    if not os.path.isdir(NODES_RUN):
        return []
    out = []
    for name, st in read_dir(NODES_RUN):
        if isinstance(st, dict) and isinstance(st.get("id"), str) and ID_RE.fullmatch(st["id"]):
            try:
                out.append(inspect(st["id"]))
            except NotFound:
                continue
    return out


def kill(node_id):
    """Cut the node's power: SIGKILL to everything in its cgroup subtree at once (PID 1, its engine, every
    container). The node stays listed, "down", until :func:`remove`."""
    st = _load(node_id)
    rec = Recorder(f"kill node {node_id}")
    if st.get("machine"):  # a computer of its own: its power, cut by its own kernel
        try:
            rec.fact("machine", machine.call(st["machine"], "machine.poweroff", timeout=30))
        except TransportError as exc:  # (the power may go before the answer is out: inspect says which)
            rec.fact("machine", f"no answer to the power cut: {exc}")
        finally:
            machine.forget(st["machine"])
        return rec.to_dict(id=node_id)
    try:
        cgroups.kill(_name(node_id), rec)
    except NotFound:
        pass
    return rec.to_dict(id=node_id)


class _Engine(Channel):
    """The agent's own channel to a node's engine (its daemon's socket): what :func:`call` relays through, so
    that a client anywhere (over SSH to the lab VM too) drives a node with the same requests as the host."""

    name = "node"

    def __init__(self, path, timeout=None):
        super().__init__(timeout)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(min(5.0, timeout or 5.0))  # (a frozen node's engine says no hello: a heartbeat missed)
        try:
            self.sock.connect(path)
            self.file = self.sock.makefile("rb")
            self.hello = protocol.check_hello(protocol.decode(self.file.readline(protocol.MAX_LINE + 1)))
        except OSError as exc:
            self.sock.close()
            raise TransportError(f"the node's engine does not answer ({exc})",
                                 fix="see lab.call('node.inspect', ...): a paused or killed node answers "
                                     "nothing") from None

    def _roundtrip(self, req, line, timeout):
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(line)
            answer = self.file.readline(protocol.MAX_LINE + 1)
        except OSError as exc:  # (socket.timeout is an OSError: a node that froze or died meanwhile)
            raise TransportError(f"the node's engine did not answer {req['method']}: {exc}",
                                 fix="see lab.call('node.inspect', ...)") from None
        if not answer:
            raise TransportError(f"the node's engine hung up during {req['method']}", fix="its node went down")
        return protocol.decode(answer)

    def close(self):
        self.sock.close()


def call(node_id, op, params=None, timeout=30):
    """One request to node ``node_id``'s engine (method ``op`` with ``params``), relayed; its answer, or its
    error as raised there. ``timeout``: seconds (a frozen node answers nothing)."""
    if not isinstance(op, str) or not isinstance(params or {}, dict):
        raise InvalidSpec("node.call takes a method name (op) and a params object", fix="e.g. op='container.ps'")
    if op.startswith(("node.", "cluster.", "service.", "stack.", "manager.", "machine.")) or \
            op in ("cleanup", "daemon.stop"):
        raise InvalidSpec(f"{op} is the host's to do, not a node's", fix="call it on the host's agent")
    st = _load(node_id)
    if st.get("machine"):
        return machine.call(st["machine"], op, params, timeout=timeout)
    if not st.get("pid") or not recorded_process(st) or not _own_engine(st["pid"]):
        raise TransportError(f"node {node_id} is down", fix=f"see lab.call('node.inspect', node_id={node_id!r})")
    eng = _Engine(daemon_socket(st["pid"]), timeout=timeout)
    try:
        return eng.call(op, **(params or {}))
    finally:
        eng.close()


def call_machine(node_id, op, params=None, timeout=30):
    """A ``machine.*`` request to a machine node's agent (the cluster's own: joining it, its mesh), which
    :func:`call` does not relay."""
    st = _load(node_id)
    if not st.get("machine") or not isinstance(op, str) or not op.startswith("machine."):
        raise InvalidSpec(f"{op!r} to node {node_id}: only machine.* requests, to a node on a machine of its own",
                          fix="lab.call('node.call', ...) relays the engine's requests")
    return machine.call(st["machine"], op, params, timeout=timeout)


def _not_on_a_machine(st, what):
    if st.get("machine"):
        raise InvalidSpec(f"node {st['id']} is a machine of its own ({st['machine']}): labkit cannot {what} it "
                          "from here", fix="suspend its VM from the laptop: `vagrant suspend NAME`, then "
                                           "`vagrant resume NAME` (a hung machine, as node.pause makes one)")


def pause(node_id):
    """Freeze the node's cgroup subtree: a hung machine (its processes are there, none runs, nothing answers)."""
    _not_on_a_machine(_load(node_id), "freeze")
    return cgroups.freeze(_name(node_id), True).to_dict(id=node_id)


def resume(node_id):
    _not_on_a_machine(_load(node_id), "thaw")
    return cgroups.freeze(_name(node_id), False).to_dict(id=node_id)


def remove(node_id):
    """Kill the node, then give back what it held: its address and process entry, its cgroups (the
    containers' below them too), its container store and state."""
    st = _load(node_id)
    rec = Recorder(f"remove node {node_id}")
    if st.get("machine"):  # what the cluster made there its agent undoes (if the machine is up: else its reboot did)
        try:
            rec.fact("left", machine.call(st["machine"], "machine.leave", {"cluster": st["spec"]["cluster"]},
                                          timeout=60)["facts"])
        except LabkitError as exc:
            rec.fact("left", f"machine {st['machine']} did not undo its part ({exc}); `labkit cleanup` there does")
        machine.forget(st["machine"])
        os.unlink(_state_path(node_id))
        return rec.to_dict(id=node_id)
    try:
        cgroups.kill(_name(node_id), rec)
    except NotFound:
        pass
    try:
        rec.steps += process.stop(_name(node_id), timeout=0)["steps"]
    except NotFound:
        pass
    rec.steps += cgroups.remove(_name(node_id))["steps"]
    store = f"{NODES_DIR}/{st['id']}"
    if os.path.isdir(store):
        shutil.rmtree(store)  # (its overlay mounts lived in the node's mount namespace, gone with it)
        rec.file("rmtree", store)
    os.unlink(_state_path(node_id))
    return rec.to_dict(id=node_id)


def cleanup(rec):
    """``labkit cleanup``'s part: every node recorded, removed; a store left without a record, deleted."""
    for n in list_nodes() if os.path.isdir(NODES_RUN) else []:
        try:
            rec.steps += remove(n["id"])["steps"]
        except LabkitError as exc:
            rec.fact(f"node {n['id']}", str(exc))
    if os.path.isdir(NODES_DIR):
        for name in os.listdir(NODES_DIR):
            if ID_RE.fullmatch(name) and not os.path.exists(_state_path(name)):
                shutil.rmtree(f"{NODES_DIR}/{name}", ignore_errors=True)
                rec.file("rmtree", f"{NODES_DIR}/{name}")


# -- inside the node ------------------------------------------------------------------------------------------

def _own_mounts(node_id):
    """As PID 1 of the node, in its private copy of the host's mounts: its own /run/labkit, container store,
    /sys (this network namespace's) and cgroup mounts (rooted at the node's cgroup by its cgroup namespace)."""
    # read before /sys is mounted anew; one per mount point, the one on top (where a grading sandbox mounted
    # its own over the host's, both are listed, and the same hierarchy mounted twice on one place is EBUSY)
    hier = list({mp: (mp, fstype, ctrls) for mp, fstype, ctrls in cgroups.hierarchies()}.values())
    nosuid = kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC
    os.makedirs(RUN_DIR, exist_ok=True)
    kernel.mount("tmpfs", RUN_DIR, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV, "mode=755")
    for sub, where in OWN_DIRS.items():
        os.makedirs(where, mode=0o700, exist_ok=True)
        kernel.mount(f"{NODES_DIR}/{node_id}/{sub}", where, None, kernel.MS_BIND)
    kernel.mount("sysfs", "/sys", "sysfs", nosuid)
    if not any(mp == "/sys/fs/cgroup" for mp, _, _ in hier):
        kernel.mount("tmpfs", "/sys/fs/cgroup", "tmpfs", nosuid, "mode=755")
    for mp, fstype, ctrls in sorted(hier, key=lambda h: h[0].count("/")):
        if fstype == "cgroup2":
            os.makedirs(mp, exist_ok=True)
            kernel.mount("cgroup2", mp, "cgroup2", nosuid)
        elif set(ctrls) & set(cgroups.CONTROLLERS):
            os.makedirs(mp, exist_ok=True)
            kernel.mount("cgroup", mp, "cgroup", nosuid, ",".join(ctrls))


def _leave_root():
    """On a cgroup v2 hierarchy with controllers (the lab VM): PID 1 (and so everything it starts) moves into a
    leaf of the node's own, ``init``, as systemd's units live in leaves: v2 gives a cgroup's controllers to its
    children only while it holds no process itself, and the node's containers' cgroups are its children."""
    root = "/sys/fs/cgroup"
    try:
        with open(f"{root}/cgroup.controllers") as f:
            if not f.read().split():
                return  # (hybrid: the controllers are v1's, which have no such rule)
    except OSError:
        return
    os.makedirs(f"{root}/init", exist_ok=True)
    with open(f"{root}/init/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def init(node_id):
    """The node's PID 1: its own mounts, then labkit's daemon (its engine) as its child; it reaps whatever is
    orphaned to it, passes SIGTERM on, and ends when the daemon does."""
    _check_id(node_id)
    _own_mounts(node_id)
    _leave_root()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            from . import daemon
            code = daemon.run(docker_api=True)
        except BaseException as exc:  # noqa: BLE001 - said in the node's log, never raised past the fork
            print(f"node {node_id}: the engine failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            os._exit(code if isinstance(code, int) else 1)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: os.kill(child, signal.SIGTERM))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == child:
            return os.waitstatus_to_exitcode(status)


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "init":
        print("usage: python -m labkit.agent.node init CLUSTER-NODE", file=sys.stderr)
        return 2
    if os.getpid() != 1:
        print("labkit.agent.node init runs as PID 1 of a node's PID namespace (lab.call('node.create', ...))",
              file=sys.stderr)
        return 2
    return init(args[1])


if __name__ == "__main__":
    raise SystemExit(main())
