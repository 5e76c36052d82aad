"""Machines: cluster nodes that are computers of their own, reached over SSH (lab 09's multi-VM option).

A machine node is another computer on a private network that runs labkit's agent: a worker VM of the
multi-machine Vagrantfile (``LABKIT_VM_NODES=3 vagrant up``: lab-manager, worker1, worker2). The cluster on
the manager machine reaches it with ``ssh -i KEY labkit-node@ADDRESS``; on the worker, that key may run one
command only, labkit's agent as root (``vagrant/provision.sh --worker`` writes the forced command and the one
sudo rule), so the manager speaks to it the same wire protocol every client speaks, and its engine is that
machine's labkit. Host keys are learned on first contact and kept in :data:`KNOWN_HOSTS` (the machines come up
together on a private network made by the same Vagrantfile); a key that changes later is refused.

This module owns both ends:

- the manager's side: :class:`Ssh`, a wire :class:`~labkit.wire.channel.Channel` over one ``ssh`` process, and
  :func:`call`, which keeps a few open per machine in this process (a TCG guest starts its agent in seconds;
  a heartbeat cannot wait for that) and drops one that timed out or broke;
- the machine's side (methods its agent serves): :func:`hello` (boot id, hostname, whether it is a cluster
  worker), :func:`join` and :func:`leave` (the routes to the other nodes' task ranges, the services' virtual
  range made unreachable), :func:`mesh` (the cluster's routing-mesh table, built here from checked addresses
  and ports), :func:`poweroff` (a power cut: sysrq ``o``, no shutdown, no sync; only on a machine
  provisioned as a cluster worker, :data:`WORKER_MARK`), and :func:`image_have`, :func:`blob_put`,
  :func:`image_put`: a task's image handed over by the manager (:func:`push_image`), layer by layer, each
  verified against its digest and unpacked as any untrusted layer is. What they make is recorded in
  ``/run/labkit/machine/<cluster>.json`` before it is made, and :func:`cleanup` (part of ``labkit cleanup``
  there) undoes it.

Standard library only.
"""
import base64
import binascii
import ipaddress
import os
import secrets
import select
import subprocess
import threading
import time

from ..wire import protocol
from ..wire.channel import Channel
from ..wire.errors import (Conflict, InvalidSpec, LabkitError, MechanismError, NotFound, PrivilegeError,
                           TransportError)
from ..wire.specs import CLUSTER_NAME, RUN_DIR, STATE_DIR, check_cluster_name, check_machine_address, check_port
from . import store
from .runner import Recorder, read_text, run, which
from .state import private_dir, read_json, write_json

CLUSTER_DIR = "/etc/labkit/cluster"
KEY = CLUSTER_DIR + "/id_rsa"                  # the manager machine's key (provision.sh --cluster-key)
KNOWN_HOSTS = CLUSTER_DIR + "/known_hosts"     # the workers' host keys, learned on first contact
WORKER_MARK = CLUSTER_DIR + "/worker"          # on a worker: it may be powered off by its cluster
USER = "labkit-node"                           # the workers' user whose key runs only labkit's agent
RECORDS = RUN_DIR + "/machine"                 # (on a worker) <cluster>.json: the routes and mesh made there
CONNECT_TIMEOUT = 10
HELLO_TIMEOUT = 60                             # an agent's start under TCG takes seconds
POOL = 4                                       # open channels kept per machine in one process
INCOMING = STATE_DIR + "/machine-incoming"     # (on a worker) layers on their way from the manager
CHUNK = 4 << 20                                # a layer's bytes per request (base64 on the wire: a third more)
MAX_LAYERS = 128
MAX_LAYER = 16 << 30                           # a layer's size at most (tarsafe's bound for an unpacked one)


# -- the manager's side --------------------------------------------------------------------------------------------

def ssh_argv(address):
    """The ssh command that reaches ``address``'s agent (the forced command there; nothing is asked for)."""
    address = check_machine_address(address)
    if not os.path.isfile(KEY):
        raise InvalidSpec(f"this machine has no cluster key ({KEY}): it cannot reach machine {address}",
                          fix="bring the machines up together: `LABKIT_VM_NODES=3 vagrant up` in vagrant/ "
                              "(the manager gets the key, each worker lets it run labkit's agent)")
    if not which("ssh"):
        raise InvalidSpec("ssh is not installed here", fix="apt-get install openssh-client")
    return ["ssh", "-T", "-i", KEY, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={KNOWN_HOSTS}",
            "-o", "HashKnownHosts=no", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=2", "-o", "LogLevel=ERROR", f"{USER}@{address}"]


class Ssh(Channel):
    """One ``ssh`` process to a machine's agent: requests in, answers out, each within its time limit. A
    request that runs out of time, a stream that ends or a line that does not decode breaks the channel (its
    process is killed): the caller opens another. What the agent says on stderr is read as it comes (its tail
    kept for an error message), so that a long-lived channel never stalls on a full pipe."""

    name = "machine"

    def __init__(self, address, timeout=None):
        super().__init__(timeout)
        self.address = address
        self.broken = None
        self._buf = b""
        self._err = b""
        self.proc = subprocess.Popen(ssh_argv(address), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            line = self._readline(time.monotonic() + HELLO_TIMEOUT)
            if not line:
                self.proc.kill()
                time.sleep(0.1)  # (what ssh said on its way out)
                said = " / ".join(self._err.decode(errors="replace").strip().splitlines()[-3:])[-400:] or "no output"
                fix = (f"the machine's host key changed (a worker VM made anew): ssh-keygen -R {address} -f "
                       f"{KNOWN_HOSTS}, then try again" if "HOST IDENTIFICATION HAS CHANGED" in said or
                       "host key" in said.lower() else
                       f"is the machine up, and provisioned as a worker? `ssh -i {KEY} {USER}@{address}` from "
                       "here must start labkit's agent")
                raise TransportError(f"machine {address}'s agent did not start: {said}", fix=fix)
            self.hello = protocol.check_hello(protocol.decode(line, sender="agent"))
        except BaseException:
            self.close()
            raise

    def _drain(self):
        try:
            for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
                self._err = (self._err + chunk)[-4096:]
        except (OSError, ValueError):
            pass

    @property
    def alive(self):
        return not self.broken and self.proc.poll() is None

    def _readline(self, deadline):
        """One line, b"" at the stream's end; None when the deadline passes first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self._buf += chunk
            if len(self._buf) > protocol.MAX_LINE and b"\n" not in self._buf:
                self.broken = "a line longer than the protocol allows"
                return b""
        line, _, self._buf = self._buf.partition(b"\n")
        return line + b"\n"

    def _roundtrip(self, req, line, timeout):
        if not self.alive:
            self.broken = self.broken or "its ssh ended"
            raise TransportError(f"the channel to machine {self.address} broke: {self.broken}", fix="call again")
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            self.broken = str(exc)
            raise TransportError(f"machine {self.address} hung up: {exc}", fix="is it up?") from None
        got = self._readline(time.monotonic() + timeout)
        if not got:
            self.broken = self.broken or ("no answer in time" if got is None else "the stream ended")
            raise TransportError(f"machine {self.address} did not answer {req['method']} "
                                 f"({self.broken}, {timeout:g} s)", fix="see lab.call('node.inspect', ...)")
        try:
            return protocol.decode(got, sender="agent")
        except LabkitError:
            self.broken = "a line that does not decode"
            raise

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except (OSError, ValueError):
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


_idle = {}              # address -> [open channels not in use]
_connecting = {}        # address -> an Event set when the attempt to open a channel ends
_failed = {}            # address -> (monotonic time, why) of the last attempt that failed
_met = set()            # addresses this process has tried to reach (an attempt ended)
_pool_lock = threading.Lock()
RETRY_AFTER = 3.0       # seconds before a machine that did not answer is tried again


def _connect(address, done):
    try:
        chan = Ssh(address)
        with _pool_lock:
            _idle.setdefault(address, []).append(chan)
            _failed.pop(address, None)
    except Exception as exc:  # noqa: BLE001 - said to every caller that waits for this machine
        with _pool_lock:
            _failed[address] = (time.monotonic(), exc)
    finally:
        with _pool_lock:
            _connecting.pop(address, None)
            _met.add(address)
        done.set()


def _open(address, wait):
    """An open channel to ``address`` within ``wait`` seconds, or TransportError. Opening one (ssh, then the
    agent's start there) goes on in a thread of its own. A machine that did not answer its last attempt is
    not waited for (another attempt starts in the background, at most every RETRY_AFTER seconds: a heartbeat
    to a machine that lost its power must not hold the manager's step for ssh's timeout), unless the caller
    waits long enough for an agent's start (HELLO_TIMEOUT: a node's creation). A first contact from this
    process (a manager that just started) waits that long too: a machine is not down for its ssh's start."""
    dead = []
    with _pool_lock:
        if address not in _met:
            wait = max(wait, HELLO_TIMEOUT)
    began = time.monotonic()
    deadline = began + wait
    try:
        while True:
            with _pool_lock:
                free = _idle.setdefault(address, [])
                while free:
                    chan = free.pop()
                    if chan.alive:
                        return chan
                    dead.append(chan)  # (its ssh ended while it sat here: a network blip, a reboot)
                done = _connecting.get(address)
                when, why = _failed.get(address, (None, None))
                if done is None and (when is None or time.monotonic() - when >= RETRY_AFTER):
                    done = _connecting[address] = threading.Event()
                    threading.Thread(target=_connect, args=(address, done), daemon=True).start()
                if when is not None and (wait < HELLO_TIMEOUT or when >= began):  # (or an attempt failed meanwhile)
                    said = why.message if isinstance(why, LabkitError) else str(why)
                    raise TransportError(f"machine {address} does not answer: {said}",
                                         fix=getattr(why, "fix", "") or "is it up? see lab.call('node.inspect', ...)")
            left = deadline - time.monotonic()
            if left <= 0 or (done is not None and not done.wait(left)):
                raise TransportError(f"machine {address}'s agent did not answer within {wait:g} s",
                                     fix="is it up? see lab.call('node.inspect', ...)")
            if done is None:
                time.sleep(min(0.1, left))
    finally:
        for chan in dead:
            chan.close()


def call(address, op, params=None, timeout=30):
    """One request to the agent of machine ``address``, on an open channel of this process (or a new one, whose
    opening may add to ``timeout``: see :func:`_open`); its answer, or its error as raised there. A channel
    that broke is closed; one whose request was answered, even with an error, goes back to the pool."""
    address = check_machine_address(address)
    params = dict(params or {})
    if not isinstance(op, str) or "_timeout" in params:
        raise InvalidSpec(f"request {op!r} with {sorted(params)}: a method name and its own parameters",
                          fix="e.g. op='container.ps', params={'all': True}")
    chan = _open(address, timeout)
    try:
        return chan.call(op, _timeout=timeout, **params)
    finally:
        _give_back(address, chan)


def _give_back(address, chan):
    with _pool_lock:
        free = _idle.setdefault(address, [])
        keep = chan.alive and len(free) < POOL
        if keep:
            free.append(chan)
    if not keep:
        chan.close()


def forget(address):
    """Close this process's channels to ``address`` (a machine powered off or removed)."""
    with _pool_lock:
        chans = _idle.pop(address, [])
        _failed.pop(address, None)  # (but it stays met: a heartbeat to it is not a first contact's long wait)
    for c in chans:
        c.close()


def route_to(address):
    """(this machine's own address on the way to ``address``, the interface it goes out of): the manager
    machine's, for its workers' routes and for its 127.0.0.1 reaching their tasks."""
    res = run(["ip", "-o", "route", "get", check_machine_address(address)], check=False)
    words = res.stdout.split()
    if not res.ok or "src" not in words or "dev" not in words:
        raise TransportError(f"no route from here to machine {address}",
                             fix="are the machines on one private network? (`ip route get ADDRESS`)")
    return str(ipaddress.IPv4Address(words[words.index("src") + 1])), words[words.index("dev") + 1]


# -- the machine's side --------------------------------------------------------------------------------------------

def _record_path(cluster):
    return f"{RECORDS}/{check_cluster_name(cluster)}.json"


def _subnet(text, what):
    try:
        net = ipaddress.ip_network(text, strict=True)
    except (TypeError, ValueError):
        raise InvalidSpec(f"{what} {text!r} is not a network", fix="e.g. 10.214.1.0/24") from None
    if net.version != 4 or not net.is_private or net.prefixlen < 8:
        raise InvalidSpec(f"{what} {net} is not a private IPv4 network", fix="e.g. 10.214.1.0/24")
    return str(net)


def _address(text, what):
    try:
        return str(ipaddress.IPv4Address(text))
    except (TypeError, ValueError):
        raise InvalidSpec(f"{what} {text!r} is not an IPv4 address", fix="e.g. 10.214.1.2") from None


def _worker_only(what):
    if not os.path.isfile(WORKER_MARK):
        raise PrivilegeError(f"this machine is not a cluster worker: labkit does not {what} here "
                             f"({WORKER_MARK} is made by `provision.sh --worker` on a worker VM)",
                             fix="a cluster on one host: lab.call('cluster.create', spec={'name': ..., 'workers': 2})")


def hello():
    """Who this machine is: its kernel's boot id (a new one: it rebooted, and what ran there is gone), its
    hostname, whether it is provisioned as a cluster worker, and the clusters it is a node of."""
    return {"boot_id": (read_text("/proc/sys/kernel/random/boot_id") or "").strip(),
            "hostname": (read_text("/proc/sys/kernel/hostname") or "").strip(),
            "worker": os.path.isfile(WORKER_MARK), "clusters": memberships()}


def _own_networks():
    """The networks this machine is on (its addresses' prefixes): no cluster route may cover one of them."""
    res = run(["ip", "-o", "-4", "addr", "show"], check=False)
    nets = []
    for line in res.stdout.splitlines():
        words = line.split()
        if "inet" in words:
            try:
                nets.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
            except (ValueError, IndexError):
                continue
    return nets


def join(cluster, routes, unreachable):
    """Make this machine a node of ``cluster``: a route to each other node's task range (``routes``: [[subnet,
    via], ...], ``via`` an address on one of this machine's networks) and the services' virtual range
    ``unreachable`` (an address with no DNAT rule goes nowhere, not out of the default route). No range may
    cover a network this machine is on (its own, the private one, Vagrant's management one). Recorded first;
    joining again (a rebooted machine) writes the same routes again."""
    _worker_only("join a cluster")
    path = _record_path(cluster)
    if not isinstance(routes, (list, tuple)) or \
            not all(isinstance(r, (list, tuple)) and len(r) == 2 for r in routes):
        raise InvalidSpec(f"routes {routes!r} is not [[subnet, via], ...]",
                          fix="e.g. [['10.214.0.0/24', '192.168.56.10']]")
    want = [(_subnet(s, "route"), _address(v, "via")) for s, v in routes]
    vip = _subnet(unreachable, "virtual range")
    own = _own_networks()
    for subnet in [s for s, _ in want] + [vip]:
        hit = [str(n) for n in own if ipaddress.ip_network(subnet).overlaps(n)]
        if hit:
            raise InvalidSpec(f"cluster range {subnet} covers this machine's own network {hit[0]}",
                              fix="give the cluster ranges apart from the machines' networks (subnet=, tasks=)")
    for _, via in want:
        if not any(ipaddress.IPv4Address(via) in n for n in own):
            raise InvalidSpec(f"{via} is on none of this machine's networks", fix="the manager's private address")
    others = [c for c in memberships() if c != cluster]
    if others:
        raise Conflict(f"this machine is a node of cluster {others[0]} already",
                       fix=f"remove that cluster first (on its manager: lab.call('cluster.remove', "
                           f"name={others[0]!r}))")
    private_dir(RECORDS)
    old = read_json(path, default=None)
    st = old if isinstance(old, dict) and old.get("cluster") == cluster else {"cluster": cluster, "routes": [],
                                                                             "vips": None, "mesh": None}
    for subnet, via in want:
        if [subnet, via] not in st["routes"]:
            st["routes"].append([subnet, via])
    st["vips"] = vip
    write_json(path, st)
    rec = Recorder(f"join cluster {cluster}")
    for subnet, via in want:
        rec.run(["ip", "route", "replace", subnet, "via", via])
    rec.run(["ip", "route", "replace", "unreachable", vip])
    return rec.to_dict(cluster=cluster)


def mesh(cluster, ports, vips):
    """This machine's part of ``cluster``'s routing mesh: ``ports`` [[published, proto, target, [task addresses]],
    ...] and ``vips`` [[virtual address, [task addresses]], ...] (each inside the virtual range it joined with),
    written as the table labkit_mesh_<cluster> (the manager's own rules,
    :func:`labkit.agent.manager.ruleset`), in place of the last. Port 22 is the machine's own SSH, which its
    cluster reaches it by: never published here."""
    from . import manager
    _worker_only("write a cluster's routing mesh")
    path = _record_path(cluster)
    st = read_json(path, default=None)
    if not isinstance(st, dict) or st.get("cluster") != cluster or not st.get("vips"):
        raise NotFound(f"this machine is no node of cluster {cluster}", fix="lab.call('cluster.create', ...) joins it")
    vip_range = ipaddress.ip_network(_subnet(st["vips"], "virtual range"))
    backends, virtual = {}, {}
    for entry in ports or []:
        if not isinstance(entry, (list, tuple)) or len(entry) != 4 or entry[1] not in ("tcp", "udp") \
                or not isinstance(entry[3], (list, tuple)):
            raise InvalidSpec(f"mesh port {entry!r} is not [published, proto, target, [addresses]]",
                              fix="e.g. [8080, 'tcp', 80, ['10.214.1.2']]")
        if check_port(entry[0]) == 22:
            raise InvalidSpec("port 22 is this machine's SSH, which its cluster reaches it by",
                              fix="publish the service on another port")
        backends[(check_port(entry[0]), entry[1])] = (check_port(entry[2]), [_address(a, "task") for a in entry[3]])
    for entry in vips or []:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], (list, tuple)):
            raise InvalidSpec(f"virtual address {entry!r} is not [address, [addresses]]",
                              fix="e.g. ['10.214.255.2', ['10.214.1.2']]")
        vip = _address(entry[0], "virtual address")
        if ipaddress.IPv4Address(vip) not in vip_range:
            raise InvalidSpec(f"virtual address {vip} is outside the cluster's virtual range {vip_range}",
                              fix="a service's virtual address is the manager's to give")
        virtual[vip] = [_address(a, "task") for a in entry[1]]
    table = manager.mesh_table_name(cluster)
    if not st.get("mesh"):
        st["mesh"] = table
        write_json(path, st)
    # (prerouting only: a worker's own 127.0.0.1 would reach tasks on other machines only with route_localnet on
    # its uplink, which a worker is not given; its address, and the manager's 127.0.0.1, answer)
    text, rules = manager.ruleset(table, backends, virtual, local_hook=False)
    # written every time: each of the manager's channels is an agent process of its own here, whose memory of
    # what it wrote last says nothing of what another one wrote since
    manager.apply_rules(table, text, rules, remember=False)
    return {"table": table, "ports": len(backends), "vips": len(virtual)}


def leave(cluster):
    """Undo what :func:`join` and :func:`mesh` made for ``cluster`` here (its routes, its mesh table)."""
    path = _record_path(cluster)
    st = read_json(path, default=None)
    rec = Recorder(f"leave cluster {cluster}")
    if not isinstance(st, dict):
        return rec.to_dict(cluster=cluster, member=False)
    made = [r for r in st.get("routes") or [] if isinstance(r, list) and len(r) == 2]
    for subnet, via in made:
        try:
            rec.run(["ip", "route", "delete", _subnet(subnet, "route"), "via", _address(via, "via")], check=False)
        except InvalidSpec:
            continue  # (a record changed by hand: nothing of ours to delete)
    if st.get("vips"):
        try:
            rec.run(["ip", "route", "delete", "unreachable", _subnet(st["vips"], "virtual range")], check=False)
        except InvalidSpec:
            pass
    table = st.get("mesh")
    if table and table == _mesh_name(cluster) and which("nft") and \
            run(["nft", "list", "table", "ip", table], check=False).ok:
        rec.run(["nft", "delete", "table", "ip", table])
    os.unlink(path)
    return rec.to_dict(cluster=cluster, member=True)


def _mesh_name(cluster):
    from . import manager
    return manager.mesh_table_name(cluster)


def poweroff():
    """Cut this machine's power a moment after answering (sysrq ``o``: no shutdown, no sync, as a power cut):
    only a machine provisioned as a cluster worker (:data:`WORKER_MARK`) accepts."""
    _worker_only("power off")

    def cut():
        with open("/proc/sys/kernel/sysrq", "w") as f:
            f.write("1")
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("o")
    threading.Timer(1.0, cut).start()  # (time for the answer to cross SSH, from an emulated guest too)
    return {"powering_off": True}


def memberships():
    """The clusters this machine is recorded a node of (for ``labkit cleanup``'s plan)."""
    if not os.path.isdir(RECORDS):
        return []
    return sorted(fn[:-5] for fn in os.listdir(RECORDS) if fn.endswith(".json") and CLUSTER_NAME.fullmatch(fn[:-5]))


def cleanup(rec):
    """``labkit cleanup``'s part on a machine: what every recorded cluster made here (routes, mesh table), and
    layers a manager began to send and never finished."""
    if os.path.isdir(INCOMING):
        for fn in os.listdir(INCOMING):
            if fn.endswith(".part"):
                os.unlink(os.path.join(INCOMING, fn))
                rec.file("unlink", os.path.join(INCOMING, fn))
    for name in memberships():
        try:
            rec.steps += leave(name)["steps"]
        except LabkitError as exc:
            rec.fact(f"cluster membership {name}", str(exc))


# -- images: the manager hands a worker a task's image ----------------------------------------------------------

def push_image(address, ref, timeout=120):
    """The manager's side: image ``ref`` as this machine's store has it, on machine ``address`` too (a worker
    pulls from no registry: the manager sends the layers it lacks, then the image's record). Returns the
    digests sent (none when the machine had the image already)."""
    image = store.load_image(ref)
    layers, config = list(image["layers"]), image["config"]
    said = call(address, "machine.image_have", {"ref": ref, "layers": layers, "config": config}, timeout=timeout)
    if said.get("same") and not said.get("missing"):
        return []
    sent = []
    for digest in said.get("missing") or []:
        if digest not in layers:
            continue  # (only what this image is made of leaves this machine)
        token, offset = secrets.token_hex(8), 0
        try:
            f = open(store.blob_path(digest), "rb")
        except OSError as exc:
            raise NotFound(f"layer {digest} of image {ref} is missing here ({exc.strerror})",
                           fix=f"build or pull {ref} again") from None
        with f:
            while True:
                data = f.read(CHUNK)
                last = len(data) < CHUNK
                call(address, "machine.blob_put", {"digest": digest, "token": token, "offset": offset, "last": last,
                                                   "data": base64.b64encode(data).decode()}, timeout=timeout)
                offset += len(data)
                if last:
                    break
        sent.append(digest)
    call(address, "machine.image_put", {"ref": ref, "layers": layers, "config": config,
                                        "history": image.get("history") or []}, timeout=timeout)
    return sent


def _candidate(ref, layers, config):
    if not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS:
        raise InvalidSpec(f"layers {layers!r:.80}: 1 to {MAX_LAYERS} digests", fix="send the image's layer list")
    for d in layers:
        store.digest_hex(d if isinstance(d, str) else repr(d))  # (refuses anything but sha256:<64 hex>)
    return {"layers": list(layers), "config": store.image_config(config, f"image {ref}")}


def image_have(ref, layers, config):
    """A worker's side: whether image ``ref`` is here as the manager has it (the same layers and config), and
    which of its layers are missing."""
    _worker_only("take images from a cluster's manager")
    want = _candidate(ref, layers, config)
    here = store.read_image(ref)
    return {"same": here is not None and store.image_id(here) == store.image_id(want),
            "missing": [d for d in want["layers"]
                        if not os.path.isdir(store.layer_dir(d)) or not os.path.isfile(store.blob_path(d))]}


def blob_put(digest, token, offset, data, last):
    """A worker's side: a piece of layer ``digest`` at ``offset`` of its upload ``token``; with ``last`` the
    whole blob is checked against its digest and taken into the store as any pulled layer (tarsafe)."""
    _worker_only("take images from a cluster's manager")
    hexd = store.digest_hex(digest if isinstance(digest, str) else repr(digest))
    if not isinstance(data, str):
        raise InvalidSpec(f"a layer's piece is {type(data).__name__}, not base64 text", fix="send the layer again")
    if not isinstance(token, str) or len(token) != 16 or any(c not in "0123456789abcdef" for c in token):
        raise InvalidSpec(f"upload token {token!r:.40} is not 16 hex digits", fix="start the upload again")
    try:
        chunk = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSpec("a layer's piece is not base64", fix="send the layer again") from None
    if len(chunk) > CHUNK or not isinstance(offset, int) or isinstance(offset, bool) or \
            not 0 <= offset <= MAX_LAYER - len(chunk):
        raise InvalidSpec(f"a piece of {len(chunk)} bytes at {offset!r}: at most {CHUNK} bytes, within "
                          f"{MAX_LAYER} in all", fix="send the layer in pieces of CHUNK bytes")
    private_dir(INCOMING)
    if offset == 0:
        _forget_stale_uploads()
    part = f"{INCOMING}/{hexd}.{token}.part"
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if offset == 0 else 0)
    try:
        fd = os.open(part, flags, 0o600)
    except FileExistsError:
        raise Conflict(f"upload {token} of {digest} began already", fix="start with a new token") from None
    except FileNotFoundError:
        raise NotFound(f"no upload {token} of {digest} here", fix="start it at offset 0") from None
    except OSError as exc:  # (ELOOP: a link where the upload goes, planted by nobody labkit knows)
        raise Conflict(f"upload {token} of {digest} cannot be written: {exc.strerror}",
                       fix="start again with a new token") from None
    try:
        if os.fstat(fd).st_size != offset:
            raise Conflict(f"upload {token} of {digest} holds {os.fstat(fd).st_size} bytes, not {offset}",
                           fix="send the pieces in order, or start again with a new token")
        os.lseek(fd, offset, os.SEEK_SET)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:  # (ENOSPC, EIO: the upload cannot go on; its piece so far goes)
        os.unlink(part)
        raise MechanismError(f"layer {digest} could not be written here: {exc.strerror}",
                             fix="free space in /var/lib/labkit on the worker, then start the task again") from None
    finally:
        os.close(fd)
    if last is not True:
        return {"digest": digest, "bytes": offset + len(chunk)}
    try:
        with store.locked():  # (add_layer_tar checks the bytes against the digest)
            return {"digest": store.add_layer_tar(part, digest), "bytes": offset + len(chunk)}
    except OSError as exc:
        raise MechanismError(f"layer {digest} could not be stored here: {exc.strerror}",
                             fix="free space in /var/lib/labkit on the worker, then start the task again") from None
    finally:
        os.unlink(part)


STALE_UPLOAD = 600  # seconds: an upload not written for this long was abandoned (a manager gone, a timeout)


def _forget_stale_uploads():
    now = time.time()
    for fn in os.listdir(INCOMING):
        path = os.path.join(INCOMING, fn)
        try:
            if fn.endswith(".part") and now - os.lstat(path).st_mtime > STALE_UPLOAD:
                os.unlink(path)
        except FileNotFoundError:
            pass


def incoming():
    """Uploads begun here and not finished (for ``labkit cleanup``'s plan)."""
    return sorted(fn for fn in os.listdir(INCOMING) if fn.endswith(".part")) if os.path.isdir(INCOMING) else []


def image_put(ref, layers, config, history=()):
    """A worker's side: the image record of ``ref``, once every layer it names is here."""
    _worker_only("take images from a cluster's manager")
    want = _candidate(ref, layers, config)
    history = [h for h in history if isinstance(h, dict)][:256] if isinstance(history, list) else []
    with store.locked():  # (no prune between the look and the record)
        missing = [d for d in want["layers"]
                   if not os.path.isdir(store.layer_dir(d)) or not os.path.isfile(store.blob_path(d))]
        if missing:
            raise NotFound(f"image {ref}: layers {', '.join(missing)} are not here", fix="send them first (blob_put)")
        image = store.save_image(ref, dict(want, history=history, created=time.time()))
    return {"ref": image["ref"], "id": image["id"]}
