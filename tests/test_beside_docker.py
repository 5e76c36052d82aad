"""labkit beside a running Docker, as on many students' Linux machines: Debian's dockerd (docker.io) is started
here, with a container of its own serving a page on a published port and talking to a second one; then the
network and engine tests run twice in a row next to it. Docker's containers keep their connectivity
throughout and Docker's rules are neither removed nor reordered.

Docker, its bridge, its iptables rules and br_netfilter's settings live in a network namespace that this
test makes (``labkit-docker-net``, deliberately not ``lk-*``) and removes: the CI host's own firewall is
never touched, and everything labkit's tests do happens in that namespace beside Docker."""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import REPO

pytestmark = [pytest.mark.privileged, pytest.mark.slow]
DOCKERD, DOCKER = "/usr/sbin/dockerd", "/usr/bin/docker"  # Debian's, not whatever else is on PATH
NETNS = "labkit-docker-net"


def _cgroup_script():
    """Shell lines that mount this host's cgroup hierarchies again where they were: `ip netns exec` gives its
    command a fresh sysfs (the namespace's links), which hides the cgroup mounts below /sys/fs/cgroup, and
    both dockerd and labkit need them. Mounting a hierarchy again attaches to the same one."""
    lines = []
    for line in open("/proc/self/mountinfo"):
        pre, _, post = line.partition(" - ")
        mp = pre.split()[4]
        fstype, _, sopts = post.split()[:3]
        if mp == "/sys/fs/cgroup" and fstype == "tmpfs":
            lines.append("mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup")
        elif fstype == "cgroup2" and mp.startswith("/sys/fs/cgroup"):
            lines.append(f"mkdir -p {mp} && mount -t cgroup2 cgroup2 {mp}")
        elif fstype == "cgroup" and mp.startswith("/sys/fs/cgroup"):
            opts = ",".join(o for o in sopts.split(",") if o not in ("rw", "ro"))
            lines.append(f"mkdir -p {mp} && mount -t cgroup -o {opts} cgroup {mp}")
    return " && ".join(lines + ['exec "$@"'])


def ns_argv(*argv):
    """argv run in the test's network namespace, with the host's cgroups visible."""
    return ["ip", "netns", "exec", NETNS, "sh", "-c", _cgroup_script(), "sh", *argv]


def in_ns(*argv, check=True, timeout=120, **kw):
    return subprocess.run(ns_argv(*argv), capture_output=True, text=True, check=check, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def dockerd():
    if not (os.path.exists(DOCKERD) and os.path.exists(DOCKER)):
        pytest.fail("Debian's docker.io is missing: scripts/setup.sh --dev installs it")
    d = tempfile.mkdtemp(prefix="labkit-dockerd-")
    sock = f"{d}/docker.sock"
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    in_ns("ip", "link", "set", "lo", "up")
    log = open(f"{d}/dockerd.log", "wb")
    proc = subprocess.Popen(ns_argv(DOCKERD, "--data-root", f"{d}/data", "--exec-root",
                             f"{d}/exec", "-p", f"{d}/dockerd.pid", "-H", f"unix://{sock}"),
                            stdout=log, stderr=log)
    docker = [DOCKER, "-H", f"unix://{sock}"]
    try:
        for _ in range(300):
            if subprocess.run(docker + ["version"], capture_output=True).returncode == 0:
                break
            if proc.poll() is not None:
                pytest.fail("dockerd exited: " + open(f"{d}/dockerd.log").read()[-2000:])
            time.sleep(0.1)
        else:
            pytest.fail("dockerd did not answer within 30 s: " + open(f"{d}/dockerd.log").read()[-2000:])
        # an image from the host's static busybox (no hub offline), a page, a server, and a client container
        root = f"{d}/img"
        os.makedirs(f"{root}/bin")
        os.makedirs(f"{root}/www")
        shutil.copy(shutil.which("busybox", path="/usr/bin:/bin"), f"{root}/bin/busybox")
        with open(f"{root}/www/index.html", "w") as f:
            f.write("served by Docker\n")
        tar = subprocess.run(["tar", "-C", root, "-c", "."], capture_output=True, check=True).stdout
        subprocess.run(docker + ["import", "-", "lkt-busybox"], input=tar, capture_output=True, check=True)
        subprocess.run(docker + ["run", "-d", "--name", "lkt-web", "-p", "127.0.0.1:18400:80", "lkt-busybox",
                                 "/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"], capture_output=True,
                       check=True)
        ip = subprocess.run(docker + ["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "lkt-web"],
                            capture_output=True, text=True, check=True).stdout.strip()
        yield {"docker": docker, "ip": ip, "dir": d}
    finally:
        subprocess.run(docker + ["rm", "-f", "lkt-web"], capture_output=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pid in subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True)
        subprocess.run(["umount", "-R", f"{d}/exec"], capture_output=True)
        subprocess.run(["umount", "-R", f"{d}/data"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def docker_works(dk):
    """Docker's container answers on its published port from the host, and to another container by address."""
    page = in_ns(sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                 "'http://127.0.0.1:18400/', timeout=5).read().decode())", check=False)
    # busybox's own HTTP request over nc (busybox-static's wget crashes in its resolver on glibc hosts)
    get = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 5 {dk['ip']} 80"
    peer = subprocess.run(dk["docker"] + ["run", "--rm", "lkt-busybox", "/bin/busybox", "sh", "-c", get],
                          capture_output=True, text=True)
    ok = "served by Docker" in page.stdout and "served by Docker" in peer.stdout
    return ok, f"host: {page.stdout.strip()!r} {page.stderr.strip()[-300:]!r}; container: {peer.stdout.strip()!r} " \
               f"{peer.stderr.strip()[-300:]!r}"


def docker_rules():
    """Docker's iptables rules, in order, without counters and without labkit's own lines or jumps."""
    out = in_ns("iptables-save").stdout
    keep = [ln for ln in out.splitlines() if ln.startswith("-A") and "LABKIT" not in ln]
    return [re.sub(r"\[\d+:\d+\]", "", ln) for ln in keep]


def test_network_and_engine_tests_pass_twice_beside_a_running_docker(dockerd):
    ok, why = docker_works(dockerd)
    assert ok, "Docker's own containers do not work before labkit starts: " + why
    rules = docker_rules()
    assert any("DOCKER" in r for r in rules) and "policy drop" in in_ns("nft", "list", "chain", "ip", "filter",
                                                                         "FORWARD").stdout
    stop, lost = threading.Event(), []

    def watch():  # throughout, not only between the runs: Docker's published page keeps answering
        while not stop.wait(1.0):
            page = in_ns(sys.executable, "-c", "import urllib.request; urllib.request.urlopen("
                         "'http://127.0.0.1:18400/', timeout=5).read()", check=False)
            if page.returncode != 0:
                lost.append(time.strftime("%H:%M:%S ") + page.stderr.strip()[-200:])
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for run in (1, 2):
            _run_beside(dockerd, rules, run)
    finally:
        stop.set()
        watcher.join(10)
    assert lost == [], "Docker's page stopped answering while labkit's tests ran: " + "; ".join(lost[:5])
    assert "labkit" not in in_ns("nft", "list", "tables").stdout
    assert "LABKIT" not in in_ns("iptables-save").stdout


def _run_beside(dockerd, rules, run):
    res = in_ns("env", "LABKIT_SKIP_VM=1", "LABKIT_TESTS_NESTED=1", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/test_network.py", "tests/test_engine.py", cwd=REPO, check=False, timeout=1200)
    assert res.returncode == 0, f"run {run} beside Docker:\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    ok, why = docker_works(dockerd)
    assert ok, f"Docker's containers lost connectivity after run {run}: {why}"
    assert docker_rules() == rules, "Docker's rules were removed or reordered"
