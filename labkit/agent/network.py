"""Container networking: a labkit bridge, veth pairs, an address allocator, NAT and published ports.

A network is a Linux bridge ``lkbr-<name>`` holding the gateway address (.1 of its subnet). Joining a
process makes a veth pair: the host end (``lkv<8 hex>``) becomes a port of the bridge, the other end is
moved into the process's network namespace and renamed ``eth0``, gets the next free address (a
file-locked allocator, safe under concurrent starts) and a default route via the gateway. Egress is
masqueraded; ``-p HOST:CONTAINER`` is a DNAT rule, for other hosts (prerouting) and for this host
itself, 127.0.0.1 included (output, with ``route_localnet`` on the bridge and masquerading of loopback
sources; no packet with a loopback address is let in from any other interface than lo). All rules live in labkit's own nftables table ``ip labkit`` (or, without nft, in iptables
chains named ``LABKIT-*``), rebuilt as a whole from the recorded state, so removing a network or a
port removes exactly its rules. State: /run/labkit/net/<name>.json. Standard library only.
"""
import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import socket

from ..wire.errors import Conflict, InvalidSpec, MechanismError, NotFound
from ..wire.specs import RUN_DIR, NetworkSpec, PortSpec
from .runner import Recorder, read_text, run, which
from .state import private_dir, read_dir, read_json, set_aside, write_json

NET_DIR = RUN_DIR + "/net"
LOCK = NET_DIR + "/.lock"
SYSCTL_STATE = NET_DIR + "/.sysctl.json"
NFT_TABLE = "labkit"
# The links labkit makes on a host, by family: bridges lkbr-<network>, veth host ends lkv<8 hex> (their peers
# lkp<8 hex> until they move into a namespace), VM taps lkt<8 hex>, and lk-<name> for links a lab makes by hand.
LINK_NAME = re.compile(r"(lkbr-[a-z0-9]{1,8}|lk[vpt][0-9a-f]{8}|lk-[A-Za-z0-9_.-]{1,12})")
SYSCTL_KEY = re.compile(r"net\.ipv4\.(ip_forward|conf\.[A-Za-z0-9_.-]{1,15}\.route_localnet)")


def is_labkit_link(name):
    """True for a link name of one of labkit's families (what cleanup may delete); nothing else matches."""
    return isinstance(name, str) and LINK_NAME.fullmatch(name) is not None and ".." not in name


IPT_CHAINS = {("nat", "PREROUTING"): "LABKIT-PREROUTING", ("nat", "OUTPUT"): "LABKIT-OUTPUT",
              ("nat", "POSTROUTING"): "LABKIT-POSTROUTING", ("filter", "FORWARD"): "LABKIT-FORWARD",
              ("raw", "PREROUTING"): "LABKIT-LOOPBACK"}


@contextlib.contextmanager
def locked():
    private_dir(NET_DIR)
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _path(name):
    NetworkSpec(name=name)
    return f"{NET_DIR}/{name}.json"


def _load(name):
    state = read_json(_path(name))
    if not _is_state(state) or state["spec"]["name"] != name:
        raise NotFound(f"there is no labkit network {name!r}", fix=f"create it: lab.network({name!r})")
    return state


def _is_state(state):
    """True when ``state`` holds only what create/connect write: every name, address and port in it reaches
    `ip` and `nft` later, so a forged or garbled entry must not get there."""
    try:
        spec = NetworkSpec(name=state["spec"]["name"], subnet=state["spec"]["subnet"])
        net = ipaddress.ip_network(spec.subnet)
        if state["bridge"] != spec.bridge or ipaddress.ip_address(state["gateway"]) not in net:
            return False
        for m in state["members"].values():
            if not is_labkit_link(m["veth"]) or ipaddress.ip_address(m["ip"]) not in net:
                return False
        for p in state["ports"]:
            PortSpec.parse(f"{p['host_ip']}:{p['host_port']}:{p['container_port']}/{p['proto']}")
            if ipaddress.ip_address(p["ip"]) not in net:
                return False
        return isinstance(state["allocations"], dict)
    except (KeyError, TypeError, AttributeError, ValueError):  # InvalidSpec is a ValueError
        return False


def _save(state):
    write_json(_path(state["spec"]["name"]), state, indent=1)


def _all():
    out = []
    for name, st in read_dir(NET_DIR):
        if _is_state(st) and st["spec"]["name"] == name:
            out.append(st)
        else:
            set_aside(f"{NET_DIR}/{name}.json", "does not hold a network labkit made")
    return out


def backend():
    forced = os.environ.get("LABKIT_FIREWALL")
    if forced in ("nft", "iptables"):
        return forced
    if which("nft") and run(["nft", "list", "tables"], check=False).ok:
        return "nft"
    if which("iptables"):
        return "iptables"
    raise MechanismError("neither nft nor iptables is available", fix="install nftables (or iptables)")


# --- host settings -------------------------------------------------------------------------------

def _sysctl(key, value, rec):
    path = "/proc/sys/" + key.replace(".", "/")
    before = (read_text(path) or "").strip()
    saved = _saved_sysctls()
    saved.setdefault(key, before)  # remember the host's own value once, to give it back at the end
    write_json(SYSCTL_STATE, saved)
    if before != str(value):
        with open(path, "w") as f:
            f.write(str(value))
        rec.file("write", path, f"{before} -> {value}")


def _saved_sysctls():
    """The host's own sysctl values labkit changed: only the keys labkit changes, only numbers."""
    saved = read_json(SYSCTL_STATE, default={})
    return {k: v for k, v in (saved.items() if isinstance(saved, dict) else ())
            if SYSCTL_KEY.fullmatch(k) and ".." not in k and isinstance(v, str) and v.isdigit()}


def _other_bridges():
    """Bridges on this host that are not labkit's (docker0, libvirt's virbr0, ...): they route through the
    host's ip_forward as well."""
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return []
    return sorted(n for n in names if os.path.isdir(f"/sys/class/net/{n}/bridge") and not is_labkit_link(n))


def _restore_sysctls(rec):
    saved = _saved_sysctls()
    for key, value in saved.items():
        others = _other_bridges() if key == "net.ipv4.ip_forward" and value == "0" else []
        if others:  # e.g. Docker started after labkit turned forwarding on: its containers need it now
            rec.fact("ip_forward_kept", f"left at 1: {', '.join(others)} route through it too")
            continue
        path = "/proc/sys/" + key.replace(".", "/")
        if os.path.exists(path) and (read_text(path) or "").strip() != value:
            with open(path, "w") as f:
                f.write(value)
            rec.file("write", path, f"restored {value}")
    if os.path.exists(SYSCTL_STATE):
        os.unlink(SYSCTL_STATE)


# --- the firewall, rebuilt from state ------------------------------------------------------------

def _nft_ruleset(states):
    lines = [f"table ip {NFT_TABLE} {{",
             "  chain prerouting { type nat hook prerouting priority dstnat; policy accept; }",
             "  chain output { type nat hook output priority -100; policy accept; }",
             "  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }",
             "  chain forward { type filter hook forward priority 0; policy accept; }",
             "  chain loopback { type filter hook prerouting priority raw; policy accept; }", "}"]
    # route_localnet (on labkit's bridges, and on the way to a cluster's machines) lets 127.0.0.1 be DNATed out
    # of this host; it would also let a packet *to* 127.0.0.x in from that interface (a container reaching the
    # host's loopback-only services, CVE-2020-8558's hole): no loopback address comes in from anywhere but lo
    rules = [f"add rule ip {NFT_TABLE} loopback iifname != \"lo\" ip daddr 127.0.0.0/8 drop",
             f"add rule ip {NFT_TABLE} loopback iifname != \"lo\" ip saddr 127.0.0.0/8 drop"]
    for st in states:
        br, subnet = st["bridge"], st["spec"]["subnet"]
        rules.append(f"add rule ip {NFT_TABLE} postrouting ip saddr {subnet} oifname != \"{br}\" masquerade")
        rules.append(f"add rule ip {NFT_TABLE} postrouting oifname \"{br}\" ip saddr 127.0.0.0/8 masquerade")
        rules.append(f"add rule ip {NFT_TABLE} forward iifname \"{br}\" accept")
        rules.append(f"add rule ip {NFT_TABLE} forward oifname \"{br}\" ct state established,related accept")
        rules.append(f"add rule ip {NFT_TABLE} forward oifname \"{br}\" ct status dnat accept")
        for p in st["ports"]:
            match = (f"ip daddr {p['host_ip']} " if p["host_ip"] != "0.0.0.0" else "fib daddr type local ")
            dnat = f"{p['proto']} dport {p['host_port']} dnat to {p['ip']}:{p['container_port']}"
            rules.append(f"add rule ip {NFT_TABLE} prerouting {match}{dnat}")
            rules.append(f"add rule ip {NFT_TABLE} output {match}{dnat}")
    return "\n".join(lines), rules


def _apply_firewall(rec):
    states = _all()
    kind = backend()
    rec.fact("firewall", kind)
    if kind == "nft":
        exists = run(["nft", "list", "table", "ip", NFT_TABLE], check=False).ok
        if not states:
            if exists:
                rec.run(["nft", "delete", "table", "ip", NFT_TABLE])
            _forward_guard(states, rec)
            return
        table, rules = _nft_ruleset(states)
        script = (f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n" if exists else "") + table + "\n" + \
            "\n".join(rules) + "\n"
        rec.run(["nft", "-f", "-"], input=script)  # one transaction: the old rules go as the new ones come
        _forward_guard(states, rec)
        return
    # iptables: labkit's own chains, jumped to from the built-in ones
    for (table, builtin), chain in IPT_CHAINS.items():
        have = _ipt_has_chain(table, chain)
        if not states:
            if have:
                _remove_ipt_chain(table, chain, rec)
            continue
        if not have:
            rec.run(["iptables", "-w", "-t", table, "-N", chain])
        rec.run(["iptables", "-w", "-t", table, "-F", chain])
        hook = _forward_hook() if (table, builtin) == ("filter", "FORWARD") else builtin
        if not run(["iptables", "-w", "-t", table, "-C", hook, "-j", chain], check=False).ok:
            rec.run(["iptables", "-w", "-t", table, "-I", hook, "1", "-j", chain])
    add = lambda table, chain, *r: rec.run(["iptables", "-w", "-t", table, "-A", chain, *r])  # noqa: E731
    if states:
        add("raw", "LABKIT-LOOPBACK", "!", "-i", "lo", "-d", "127.0.0.0/8", "-j", "DROP")
        add("raw", "LABKIT-LOOPBACK", "!", "-i", "lo", "-s", "127.0.0.0/8", "-j", "DROP")
    for st in states:
        br, subnet = st["bridge"], st["spec"]["subnet"]
        add("nat", "LABKIT-POSTROUTING", "-s", subnet, "!", "-o", br, "-j", "MASQUERADE")
        add("nat", "LABKIT-POSTROUTING", "-o", br, "-s", "127.0.0.0/8", "-j", "MASQUERADE")
        for rule in _forward_rules(br):
            add("filter", "LABKIT-FORWARD", *rule)
        for p in st["ports"]:
            dst = ["-d", p["host_ip"]] if p["host_ip"] != "0.0.0.0" else ["-m", "addrtype", "--dst-type", "LOCAL"]
            tgt = ["-p", p["proto"], "--dport", str(p["host_port"]), "-j", "DNAT",
                   "--to-destination", f"{p['ip']}:{p['container_port']}"]
            add("nat", "LABKIT-PREROUTING", *dst, *tgt)
            add("nat", "LABKIT-OUTPUT", *dst, *tgt)


def _forward_rules(br):
    """iptables FORWARD rules for one labkit bridge, as labkit's nft table has them: traffic within the bridge,
    answers and published ports coming in, and anything going out -- except into Docker's bridges, which
    is left to Docker's own rules (a labkit container gets no further into Docker's networks than any
    other host would)."""
    return [["-i", br, "-o", br, "-j", "ACCEPT"],
            ["-o", br, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "ACCEPT"],
            ["-i", br, "-o", "docker0", "-j", "RETURN"],
            ["-i", br, "-o", "br-+", "-j", "RETURN"],
            ["-i", br, "-j", "ACCEPT"]]


def _forward_drops():
    """True when iptables' filter FORWARD chain drops what no rule accepts (Docker sets that policy, and its
    br_netfilter makes bridged traffic pass that chain too): an accept in labkit's own nft table does not
    override a drop in another table, so labkit then needs an accept in that chain as well."""
    if not which("iptables"):
        return False
    if _ipt_nft():  # listing through iptables-nft would create the table: ask nft, read-only
        out = run(["nft", "list", "chain", "ip", "filter", "FORWARD"], check=False) if which("nft") else None
        return bool(out and out.ok and "policy drop" in out.stdout)
    out = run(["iptables", "-w", "-t", "filter", "-S", "FORWARD"], check=False)
    return out.ok and "-P FORWARD DROP" in out.stdout


def _forward_hook():
    """Where labkit's FORWARD accepts are jumped to from: Docker's DOCKER-USER chain when it exists (the place
    Docker documents for other software's rules: Docker's own rules are neither removed nor reordered),
    else the top of FORWARD."""
    return "DOCKER-USER" if _ipt_has_chain("filter", "DOCKER-USER") else "FORWARD"


def _forward_guard(states, rec):
    """With the nft backend: the LABKIT-FORWARD iptables chain (accept labkit's bridges) while some other
    firewall drops forwarded traffic, and none otherwise."""
    chain = IPT_CHAINS[("filter", "FORWARD")]
    want = bool(states) and _forward_drops()
    have = _ipt_has_chain("filter", chain)
    if not want:
        if have:
            _remove_ipt_chain("filter", chain, rec)
        return
    if not have:
        rec.run(["iptables", "-w", "-t", "filter", "-N", chain])
    rec.run(["iptables", "-w", "-t", "filter", "-F", chain])
    for st in states:
        for rule in _forward_rules(st["bridge"]):
            rec.run(["iptables", "-w", "-t", "filter", "-A", chain, *rule])
    hook = _forward_hook()
    if not run(["iptables", "-w", "-t", "filter", "-C", hook, "-j", chain], check=False).ok:
        rec.run(["iptables", "-w", "-t", "filter", "-I", hook, "1", "-j", chain])


def _remove_ipt_chain(table, chain, rec):
    """Every jump to labkit's chain (from the built-in chain or DOCKER-USER), then the chain itself."""
    for hook in {b for (t, b), c in IPT_CHAINS.items() if t == table and c == chain} | {"DOCKER-USER"}:
        if hook == "DOCKER-USER" and (table != "filter" or not _ipt_has_chain("filter", hook)):
            continue
        while run(["iptables", "-w", "-t", table, "-C", hook, "-j", chain], check=False).ok:
            rec.run(["iptables", "-w", "-t", table, "-D", hook, "-j", chain])
    rec.run(["iptables", "-w", "-t", table, "-F", chain])
    rec.run(["iptables", "-w", "-t", table, "-X", chain])


def _ipt_nft():
    v = run(["iptables", "--version"], check=False).stdout
    return "nf_tables" in v


def _ipt_has_chain(table, chain):
    """Whether labkit's iptables chain exists, without creating iptables-nft's tables as a side effect."""
    if _ipt_nft():
        return which("nft") is not None and run(["nft", "list", "chain", "ip", table, chain], check=False).ok
    return run(["iptables", "-w", "-t", table, "-n", "-L", chain], check=False).ok


def remove_firewall(rec):
    """Remove labkit's table/chains whatever the state says (used by cleanup)."""
    if which("nft") and run(["nft", "list", "table", "ip", NFT_TABLE], check=False).ok:
        rec.run(["nft", "delete", "table", "ip", NFT_TABLE])
    if which("iptables"):
        for (table, _), chain in IPT_CHAINS.items():
            if _ipt_has_chain(table, chain):
                _remove_ipt_chain(table, chain, rec)


def firewall_leftovers():
    found = []
    if which("nft") and run(["nft", "list", "table", "ip", NFT_TABLE], check=False).ok:
        found.append(f"nft table ip {NFT_TABLE}")
    if which("iptables"):
        for (table, _), chain in IPT_CHAINS.items():
            if _ipt_has_chain(table, chain):
                found.append(f"iptables {table} {chain}")
    return found


# --- networks ------------------------------------------------------------------------------------

def create(spec: NetworkSpec):
    """Make (or reuse) a bridge network; returns its record."""
    name, subnet = spec.name, spec.subnet
    rec = Recorder(f"network {name} ({subnet})")
    with locked():
        try:
            st = _load(name)
            if st["spec"]["subnet"] != subnet:
                raise Conflict(f"network {name!r} exists with subnet {st['spec']['subnet']}",
                                  fix="remove it first or use its subnet")
            rec.fact("existed", True)
            return rec.to_dict(network=st)
        except NotFound:
            pass
        net = ipaddress.ip_network(subnet)
        for other in _all():
            if ipaddress.ip_network(other["spec"]["subnet"]).overlaps(net):
                raise InvalidSpec(f"subnet {subnet} overlaps network {other['spec']['name']!r}",
                                  fix="choose a subnet of its own, e.g. 10.214.0.0/24")
        gw = str(next(net.hosts()))
        st = {"spec": spec.to_dict(), "bridge": spec.bridge, "gateway": gw, "allocations": {gw: "gateway"},
              "ports": [], "members": {}}
        br = spec.bridge
        rec.run(["ip", "link", "add", br, "type", "bridge"])
        try:
            rec.run(["ip", "addr", "add", f"{gw}/{net.prefixlen}", "dev", br])
            rec.run(["ip", "link", "set", br, "up"])
            _sysctl("net.ipv4.ip_forward", 1, rec)
            _sysctl(f"net.ipv4.conf.{br}.route_localnet", 1, rec)
            _save(st)
            _apply_firewall(rec)
        except BaseException:
            run(["ip", "link", "delete", br], check=False)
            if os.path.exists(_path(name)):
                os.unlink(_path(name))
            raise
        rec.fact("existed", False)
        return rec.to_dict(network=st)


def loopback_out(dev, rec):
    """Let this host's 127.0.0.1 be DNATed out of interface ``dev`` (``route_localnet``: a published port asked on
    127.0.0.1 answered by a task on another machine), while some labkit network exists: given back with the
    other sysctls when the last one goes; the firewall drops loopback addresses coming in on it meanwhile."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,15}", dev or ""):  # (a dot would be a '/' in the sysctl's path)
        raise InvalidSpec(f"no such interface: {dev!r}", fix="see `ip -o link`")
    with locked():
        if not _all():
            raise NotFound("no labkit network", fix="create the cluster's network first")
        _sysctl(f"net.ipv4.conf.{dev}.route_localnet", 1, rec)


def remove(name):
    rec = Recorder(f"remove network {name}")
    with locked():
        st = _load(name)
        if st["members"]:
            raise InvalidSpec(f"network {name!r} still has members: {', '.join(st['members'])}",
                              fix="stop those processes first")
        os.unlink(_path(name))
        rec.run(["ip", "link", "delete", st["bridge"]], check=False)
        if not _all():
            _restore_sysctls(rec)  # (first: route_localnet never outlives the guard against loopback addresses)
        _apply_firewall(rec)
    return rec.to_dict()


def _allocate(st, owner, want=None):
    net = ipaddress.ip_network(st["spec"]["subnet"])
    if want:
        ip = ipaddress.ip_address(want)
        if ip not in net or str(ip) in st["allocations"]:
            raise InvalidSpec(f"address {want} is taken or outside {net}", fix="leave ip unset to get a free one")
        st["allocations"][str(ip)] = owner
        return str(ip)
    for ip in net.hosts():
        if str(ip) not in st["allocations"]:
            st["allocations"][str(ip)] = owner
            return str(ip)
    raise MechanismError(f"network {st['spec']['name']} has no free address left in {net}",
                         fix="stop some containers or use a larger subnet")


def _port_free(p):
    kind = socket.SOCK_STREAM if p.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((p.host_ip, p.host_port))
            return True
        except OSError:
            return False


def connect(name, pid, owner, ports=(), ip=None):
    """Give the network namespace of ``pid`` an eth0 on network ``name``; publish ``ports``."""
    ports = [PortSpec.parse(p) for p in ports]
    rec = Recorder(f"connect {owner} (pid {pid}) to network {name}")
    with locked():
        st = _load(name)
        if owner in st["members"]:
            raise Conflict(f"{owner!r} is on network {name!r} already", fix="disconnect it first")
        for p in ports:
            clash = [q for s2 in _all() for q in s2["ports"]
                     if q["host_port"] == p.host_port and q["proto"] == p.proto]
            if clash or not _port_free(p):
                raise Conflict(f"port {p.host_ip}:{p.host_port}/{p.proto} is already taken"
                                  + (f" by {clash[0]['owner']}" if clash else " by a program on the host"),
                                  fix="choose another host port, e.g. -p 8081:80")
        addr = _allocate(st, owner, ip)
        prefix = ipaddress.ip_network(st["spec"]["subnet"]).prefixlen
        host_end, peer = "lkv" + secrets.token_hex(4), "lkp" + secrets.token_hex(4)
        made = False
        try:
            rec.run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", peer])
            made = True
            rec.run(["ip", "link", "set", host_end, "master", st["bridge"]])
            rec.run(["ip", "link", "set", host_end, "up"])
            rec.run(["ip", "link", "set", peer, "netns", str(pid)])
            inside = ["nsenter", "--target", str(pid), "--net", "--"]
            rec.run(inside + ["ip", "link", "set", peer, "name", "eth0"])
            rec.run(inside + ["ip", "addr", "add", f"{addr}/{prefix}", "dev", "eth0"])
            rec.run(inside + ["ip", "link", "set", "eth0", "up"])
            rec.run(inside + ["ip", "link", "set", "lo", "up"])
            rec.run(inside + ["ip", "route", "add", "default", "via", st["gateway"]])
        except BaseException:
            if made:
                run(["ip", "link", "delete", host_end], check=False)
            del st["allocations"][addr]
            raise
        st["members"][owner] = {"ip": addr, "veth": host_end, "pid": pid}
        st["ports"] += [dict(p.to_dict(), ip=addr, owner=owner) for p in ports]
        _save(st)
        if ports:
            _apply_firewall(rec)
    rec.fact("ip", addr)
    rec.fact("veth", host_end)
    rec.fact("gateway", st["gateway"])
    rec.fact("ports", [f"{p.host_ip}:{p.host_port}->{addr}:{p.container_port}/{p.proto}" for p in ports])
    return rec.to_dict(ip=addr)


def attach_tap(name, owner):
    """A tap device on network ``name``'s bridge for a VM (qemu opens it); returns ip, prefix, gateway, tap."""
    rec = Recorder(f"connect VM {owner} to network {name}")
    with locked():
        st = _load(name)
        addr = _allocate(st, owner)
        tap = "lkt" + secrets.token_hex(4)
        try:
            rec.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
            rec.run(["ip", "link", "set", tap, "master", st["bridge"]])
            rec.run(["ip", "link", "set", tap, "up"])
        except BaseException:
            run(["ip", "link", "delete", tap], check=False)
            del st["allocations"][addr]
            raise
        st["members"][owner] = {"ip": addr, "veth": tap, "pid": None}
        _save(st)
    prefix = ipaddress.ip_network(st["spec"]["subnet"]).prefixlen
    return rec.to_dict(ip=addr, prefix=prefix, gateway=st["gateway"], tap=tap)


def disconnect(name, owner):
    """Undo connect(): the veth (if the namespace still exists), the address, the published ports."""
    rec = Recorder(f"disconnect {owner} from network {name}")
    with locked():
        try:
            st = _load(name)
        except NotFound:
            return rec.to_dict()
        m = st["members"].pop(owner, None)
        if m is None:
            return rec.to_dict()
        if os.path.exists(f"/sys/class/net/{m['veth']}"):
            rec.run(["ip", "link", "delete", m["veth"]], check=False)
        st["allocations"].pop(m["ip"], None)
        had_ports = any(p["owner"] == owner for p in st["ports"])
        st["ports"] = [p for p in st["ports"] if p["owner"] != owner]
        _save(st)
        if had_ports:
            _apply_firewall(rec)
    return rec.to_dict()


def inspect(name):
    return _load(name)


def list_networks():
    return _all()


def topology():
    """The live picture: every labkit bridge, its ports, addresses, and who is behind each port."""
    out = []
    for st in _all():
        br = st["bridge"]
        brif = sorted(os.listdir(f"/sys/class/net/{br}/brif")) if os.path.isdir(f"/sys/class/net/{br}/brif") else []
        members = {m["veth"]: dict(m, owner=o) for o, m in st["members"].items()}
        out.append({"network": st["spec"]["name"], "bridge": br, "subnet": st["spec"]["subnet"],
                    "gateway": st["gateway"], "ports_on_bridge": brif,
                    "members": [members.get(v, {"veth": v, "owner": "?"}) for v in brif],
                    "published": st["ports"]})
    return out


def cleanup(rec):
    """Remove every labkit network's state, rules and sysctl changes (bridges go with the lk* links)."""
    for st in _all():
        os.unlink(_path(st["spec"]["name"]))
    if os.path.exists(SYSCTL_STATE):
        _restore_sysctls(rec)
    remove_firewall(rec)
