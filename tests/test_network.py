"""Networking for real: veth pairs, bridges, NAT rules, published ports reached from the host."""
import json
import os
import socket
import subprocess
import sys

import pytest

from labkit.wire.errors import Conflict, InvalidSpec

from conftest import REPO, http_get as http

pytestmark = pytest.mark.privileged
WEB = ["httpd", "-f", "-p", "80", "-h", "/var/www"]
NS = ("uts", "pid", "mnt", "net", "ipc")




def sh(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def test_two_namespaces_ping_over_a_veth_made_by_hand(lab):
    try:
        for ns in ("lk-t-a", "lk-t-b"):
            lab.run(["ip", "netns", "add", ns], check=True)
        lab.run(["ip", "link", "add", "lkt-a", "netns", "lk-t-a", "type", "veth", "peer", "name", "lkt-b",
                 "netns", "lk-t-b"], check=True)
        for ns, dev, addr in (("lk-t-a", "lkt-a", "10.199.0.1/24"), ("lk-t-b", "lkt-b", "10.199.0.2/24")):
            lab.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            lab.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        ping = lab.run(["ip", "netns", "exec", "lk-t-a", "busybox", "ping", "-c", "1", "-W", "2", "10.199.0.2"])
        assert ping.exit_code == 0, ping.stderr
        assert "lkt-a" not in sh("ip", "-o", "link"), "both ends live in the namespaces, not on the host"
    finally:
        for ns in ("lk-t-a", "lk-t-b"):
            lab.run(["ip", "netns", "delete", ns])


@pytest.fixture
def net(lab, rootfs_name):
    n = lab.network("t", subnet="10.214.0.0/24")
    yield n
    n.remove()


def test_published_port_reached_from_localhost_and_container_to_container(lab, net, rootfs_name):
    with lab.spawn(WEB, NS, rootfs=rootfs_name, root_mode="pivot_root", network="t", ports=["18080:80"],
                   hostname="web") as web:
        ip = web.record.facts["net"]["ip"]
        assert ip.startswith("10.214.0.") and web.record.facts["net"]["gateway"] == "10.214.0.1"
        assert "Hello from a labkit container" in http("http://127.0.0.1:18080/")
        assert "Hello from a labkit container" in http(f"http://{ip}/")
        client = lab.run_in(["wget", "-q", "-O-", f"http://{ip}/"], NS, rootfs=rootfs_name,
                            root_mode="pivot_root", network="t")
        assert "Hello" in client.stdout
        inside = web.exec(["ip", "-o", "addr", "show", "eth0"]).stdout
        assert f"{ip}/24" in inside
        topo = [t for t in lab.topology() if t["network"] == "t"][0]
        assert len(topo["ports_on_bridge"]) == 1 and topo["published"][0]["host_port"] == 18080
    topo = [t for t in lab.topology() if t["network"] == "t"][0]
    assert topo["ports_on_bridge"] == [] and topo["published"] == []


def test_a_taken_port_and_bad_specs_are_refused(lab, net, rootfs_name):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        with pytest.raises(Conflict, match="already taken"):
            lab.spawn(WEB, NS, rootfs=rootfs_name, network="t", ports=[f"127.0.0.1:{port}:80"])
        with lab.spawn(WEB, NS, rootfs=rootfs_name, network="t", ports=["18081:80"]):
            with pytest.raises(Conflict, match="already taken by"):
                lab.spawn(WEB, NS, rootfs=rootfs_name, network="t", ports=["18081:80"])
    finally:
        s.close()
    with pytest.raises(InvalidSpec, match="network namespace of its own"):
        lab.spawn(WEB, ["pid"], network="t")
    with pytest.raises(InvalidSpec, match="HOST:CONTAINER"):
        lab.spawn(WEB, NS, network="t", ports=["eighty"])
    assert [t for t in lab.topology() if t["network"] == "t"][0]["members"] == []


def test_addresses_stay_unique_under_concurrent_starts(lab, net, rootfs_name):
    code = ("import sys, json; sys.path.insert(0, %r); import labkit\n"
            "lab = labkit.connect('local')\n"
            "ps = [lab.spawn((), ['net', 'pid', 'mnt'], network='t') for _ in range(4)]\n"
            "print(json.dumps([[p.id, p.record.facts['net']['ip']] for p in ps]))\n") % REPO
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    got = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    try:
        ips = [ip for batch in got for _, ip in batch]
        assert len(ips) == 16 and len(set(ips)) == 16, ips
    finally:
        for batch in got:
            for pid_id, _ in batch:
                lab.process(pid_id).stop()


def test_iptables_backend_too(lab, rootfs_name, monkeypatch):
    monkeypatch.setenv("LABKIT_FIREWALL", "iptables")
    tables_before = sh("nft", "list", "tables")
    n = lab.network("tipt", subnet="10.215.0.0/24")
    try:
        with lab.spawn(WEB, NS, rootfs=rootfs_name, network="tipt", ports=["18082:80"]):
            assert "Hello" in http("http://127.0.0.1:18082/")
            assert "LABKIT-OUTPUT" in sh("nft", "list", "table", "ip", "nat")
            assert "LABKIT-LOOPBACK" in sh("nft", "list", "table", "ip", "raw"), "loopback addresses kept out"
    finally:
        n.remove()
    assert "LABKIT" not in sh("nft", "list", "ruleset")
    for table in ("nat", "filter", "raw"):  # iptables-nft made its tables for our chains; give them back empty
        if f"table ip {table}" not in tables_before and f"table ip {table}" in sh("nft", "list", "tables"):
            assert "LABKIT" not in sh("nft", "list", "table", "ip", table)
            sh("nft", "delete", "table", "ip", table)


def test_cleanup_takes_rules_and_sysctls_back(lab, rootfs_name):
    before = open("/proc/sys/net/ipv4/ip_forward").read()
    lab.network("tclean", subnet="10.216.0.0/24")
    lab.spawn((), ["net", "pid", "mnt"], network="tclean", ports=["18083:80"])
    assert "labkit" in sh("nft", "list", "tables")
    lab.cleanup()
    assert "labkit" not in sh("nft", "list", "tables")
    assert open("/proc/sys/net/ipv4/ip_forward").read() == before
    assert not os.path.exists("/sys/class/net/lkbr-tclean")


CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()"


def test_a_neighbour_on_a_labkit_bridge_cannot_reach_the_hosts_loopback_services(lab, net):
    """route_localnet on a labkit bridge (127.0.0.1:PORT published to a container) must not let a machine on the
    bridge (a container with NET_ADMIN, a VM's tap) send to the host's 127.0.0.1, where loopback-only services
    listen (CVE-2020-8558 in kube-proxy). The attacker routes 127.0.0.1 to the gateway from a namespace of its
    own; without labkit's guard (flushed once, to show the test can fail) the connection is made."""
    ns, port = "lk-t-evil", 18099
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "lkt-e", "type", "veth", "peer", "name", "lkt-f", "netns", ns)
        sh("ip", "link", "set", "lkt-e", "master", "lkbr-t", "up")
        for argv in (["ip", "addr", "add", "10.214.0.250/24", "dev", "lkt-f"], ["ip", "link", "set", "lkt-f", "up"],
                     ["sysctl", "-qw", "net.ipv4.conf.lkt-f.route_localnet=1"],  # (the lo of ns stays down)
                     ["ip", "route", "add", "127.0.0.1/32", "via", "10.214.0.1", "dev", "lkt-f"]):
            sh("ip", "netns", "exec", ns, *argv)

        def attack():
            return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CONNECT, "127.0.0.1",
                                   str(port)], capture_output=True, text=True, timeout=30).returncode == 0
        assert not attack(), "the host's 127.0.0.1 was reached from the bridge"
        sh("nft", "flush", "chain", "ip", "labkit", "loopback")
        try:
            assert attack(), "control: without the guard the same packets reach the host's loopback"
        finally:
            lab.network("t2", subnet="10.217.0.0/24").remove()  # (the firewall rebuilt from labkit's state)
        assert "127.0.0.0/8 drop" in sh("nft", "list", "chain", "ip", "labkit", "loopback")
        assert not attack(), "the guard is back"
    finally:
        listener.close()
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", "lkt-e"], capture_output=True)
