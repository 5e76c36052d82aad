"""The engine, verb by verb, with real containers: lifecycle, survival, stop escalation, exec, ports,
concurrency, and bad input leaving nothing half-made."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from labkit.wire.errors import Conflict, InvalidSpec, LabkitError, NotFound

from conftest import REPO, http_get as http

pytestmark = pytest.mark.privileged
WEB = ["httpd", "-f", "-p", "80", "-h", "/var/www"]




@pytest.fixture(autouse=True)
def tidy(lab):
    yield
    for c in lab.containers(all=True):
        if c["name"].startswith("t-"):
            lab.container(c["id"]).rm(force=True)
    for n in lab.networks():
        if n["spec"]["name"] == "default" and not n["members"]:
            lab.call("net.remove", name="default")


def test_lifecycle_verb_by_verb(lab):
    c = lab.create("busybox", WEB, name="t-web", ports=["18100:80"], memory="64M", pids_limit=64,
                   hostname="webserver", env={"GREETING": "hi"})
    assert c.status == "created" and any(r["name"] == "t-web" for r in lab.containers(all=True))
    assert not any(r["name"] == "t-web" for r in lab.containers())
    c.start()
    assert "Hello from a labkit container" in http("http://127.0.0.1:18100/")
    info = c.inspect()
    assert info["State"]["Running"] and info["Config"]["Hostname"] == "webserver"
    ip = info["NetworkSettings"]["IPAddress"]
    assert ip.startswith("10.213.0.") and "Hello" in http(f"http://{ip}/")
    assert info["HostConfig"]["Memory"] == 64 << 20 and info["GraphDriver"]["Name"] == "overlay"
    # httpd forks a child per request: one just served may be caught exiting, its command line gone
    assert [p["cmd"] for p in c.top() if p["cmd"] != "[httpd]"] == [" ".join(WEB)]
    assert c.exec(["sh", "-c", "echo $GREETING; hostname"]).stdout.split() == ["hi", "webserver"]
    c.exec(["sh", "-c", "echo '<h1>changed</h1>' > /var/www/index.html"])
    assert "changed" in http("http://127.0.0.1:18100/")
    with pytest.raises(Conflict, match="is running"):
        c.rm()
    c.stop(timeout=1)
    assert c.status == "exited" and c.inspect()["State"]["ExitCode"] == 137  # httpd as PID 1 ignores SIGTERM
    img = c.commit("t-committed:v1")
    assert len(img["image"]["layers"]) == 2
    with pytest.raises(Conflict, match="used by container"):
        lab.rmi("busybox")
    c.start()  # a stopped container starts again with its changes
    assert "changed" in http("http://127.0.0.1:18100/")
    c.rm(force=True)
    with pytest.raises(NotFound):
        lab.container("t-web")
    with lab.create("t-committed:v1", ["cat", "/var/www/index.html"], name="t-from-commit", network=None) as c2:
        c2.start()
        c2.wait(10)
        assert "changed" in c2.logs()
    lab.rmi("t-committed:v1")
    lab.prune()


def test_rmi_force_untags_from_under_containers_that_keep_their_layers(lab):
    lab.tag("busybox", "t-rmif:v1")
    c = lab.create("t-rmif:v1", ["sleep", "60"], name="t-rmif", network=None)
    try:
        c.start()
        c.stop(timeout=0)
        with pytest.raises(Conflict, match="rmi -f"):
            lab.rmi("t-rmif:v1")
        lab.rmi("t-rmif:v1", force=True)
        assert "t-rmif:v1" not in [i["ref"] for i in lab.images()]
        lab.prune()  # the container's layers stay: its own image.json names them
        c.start()
        assert c.status == "running", "the stopped container starts again without its image's name"
    finally:
        c.rm(force=True)


def test_run_foreground_returns_exit_code_and_output(lab):
    res = lab.run_container("busybox", ["sh", "-c", "echo out; echo err >&2; exit 7"], detach=False, rm=True,
                            name="t-fg", network=None)
    assert res["exit_code"] == 7 and "out" in res["logs"] and "err" in res["logs"]
    with pytest.raises(NotFound):
        lab.container("t-fg")


def test_no_network_is_a_network_namespace_with_only_loopback(lab):
    """Docker's `--network none`: the container has its own network namespace, loopback alone, so a service
    the host keeps on 127.0.0.1 is out of its reach (it had shared the host's namespace)."""
    import socket
    with socket.socket() as host_only:
        host_only.bind(("127.0.0.1", 0))
        host_only.listen(1)
        port = host_only.getsockname()[1]
        probe = (f"readlink /proc/self/ns/net; tail -n +3 /proc/net/dev | cut -d: -f1; "
                 f"echo hi | nc -w 2 127.0.0.1 {port} 2>/dev/null && echo reached || echo refused")
        res = lab.run_container("busybox", ["sh", "-c", probe], detach=False, rm=True, name="t-nonet", network=None)
    lines = [ln.strip() for ln in res["logs"].splitlines() if ln.strip()]
    assert lines[0] != os.readlink("/proc/self/ns/net") and lines[0].startswith("net:["), lines
    assert lines[1:-1] == ["lo"] and lines[-1] == "refused", lines


def test_detached_container_survives_its_client(lab):
    code = ("import sys; sys.path.insert(0, %r); import labkit\n"
            "c = labkit.connect('local').run_container('busybox', %r, name='t-survivor', ports=['18101:80'])\n"
            "print(c.id)\n") % (REPO, WEB)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    cid = out.stdout.strip()
    # the client process is gone; the container and its monitor are not
    c = lab.container("t-survivor")
    assert c.id == cid and c.status == "running"
    assert "Hello" in http("http://127.0.0.1:18101/")
    subprocess.run([sys.executable, "-m", "labkit.cli", "stop", "-t", "1", "t-survivor"], check=True,
                   capture_output=True, cwd=REPO)
    assert c.status == "exited"


def wait_for_log(c, text, tries=200):
    for _ in range(tries):
        if text in c.logs():
            return
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in the log of {c.name}")


def test_stop_sends_sigterm_then_sigkill(lab):
    polite = lab.run_container("busybox", ["sh", "-c", "trap 'exit 0' TERM; echo ready; while :; do sleep 0.1; done"],
                               name="t-polite", network=None)
    wait_for_log(polite, "ready")  # a SIGTERM before the trap is set would just kill the shell (143)
    rec = polite.stop(timeout=5)
    assert [s["args"][1] for s in rec["steps"] if s.get("call") == "kill"] == ["SIGTERM"]
    assert polite.inspect()["State"]["ExitCode"] == 0
    stubborn = lab.run_container("busybox", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"],
                                 name="t-stubborn", network=None)
    wait_for_log(stubborn, "ready")
    t = time.monotonic()
    rec = stubborn.stop(timeout=0.5)
    assert [s["args"][1] for s in rec["steps"] if s.get("call") == "kill"] == ["SIGTERM", "SIGKILL"]
    assert stubborn.inspect()["State"]["ExitCode"] == 137 and time.monotonic() - t < 15


def test_exec_lands_in_the_containers_namespaces_and_cgroup(lab):
    c = lab.run_container("busybox", ["sleep", "1000"], name="t-exec")
    pid = c.inspect()["State"]["Pid"]
    mine = {n: lab.run(["readlink", f"/proc/{pid}/ns/{n}"]).stdout.strip() for n in ("pid", "net", "mnt", "uts", "cgroup")}
    out = c.exec(["sh", "-c", "for n in pid net mnt uts cgroup; do readlink /proc/self/ns/$n; done; "
                              "cat /proc/self/cgroup; echo $$"]).stdout.split()
    assert out[:5] == [mine[n] for n in ("pid", "net", "mnt", "uts", "cgroup")]
    cg_lines = [ln for ln in out[5:-1] if ":" in ln]
    assert cg_lines and all(ln.endswith(":/") for ln in cg_lines if ln.split(":")[1] in ("", "pids", "memory"))
    assert int(out[-1]) > 1, "the exec'd shell is a new process in the container's PID namespace"


def test_twenty_containers_from_four_clients_without_collisions(lab):
    code = ("import sys, json; sys.path.insert(0, %r); import labkit\n"
            "lab = labkit.connect('local')\n"
            "k = int(sys.argv[1]); out = []\n"
            "for i in range(5):\n"
            "    c = lab.run_container('busybox', ['sleep', '1000'], name=f't-many-{k}-{i}')\n"
            "    out.append([c.name, c.ip])\n"
            "dup = []\n"
            "for i in range(3):\n"
            "    try:\n"
            "        lab.run_container('busybox', ['sleep', '1000'], name=f't-same-{i}'); dup.append('won')\n"
            "    except labkit.LabkitError as e:\n"
            "        dup.append('refused' if 'already in use' in str(e) else str(e))\n"
            "print(json.dumps([out, dup]))\n") % REPO
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], stdout=subprocess.PIPE, text=True)
             for k in range(4)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    names = [n for out, _ in results for n, _ in out]
    ips = [ip for out, _ in results for _, ip in out]
    assert len(names) == 20 == len(set(names)) and len(set(ips)) == 20
    for i in range(3):  # each contested name went to exactly one client; the others were told why
        assert sorted(dup[i] for _, dup in results) == ["refused", "refused", "refused", "won"]
    assert sum(1 for c in lab.containers() if c["name"].startswith(("t-many-", "t-same-"))) == 23


def test_bad_input_is_refused_and_leaves_nothing(lab):
    before = {c["name"] for c in lab.containers(all=True)}
    with pytest.raises(NotFound, match="no image"):
        lab.run_container("no-such-image", ["true"], name="t-bad1")
    with pytest.raises(InvalidSpec, match="not allowed"):
        lab.run_container("../../etc", ["true"], name="t-bad2")
    lab.run_container("busybox", WEB, name="t-port", ports=["18102:80"])
    with pytest.raises(Conflict, match="already taken"):
        lab.run_container("busybox", WEB, name="t-port2", ports=["18102:80"])
    with pytest.raises(Conflict, match="already in use"):
        lab.create("busybox", WEB, name="t-port")
    with pytest.raises(InvalidSpec, match="too small"):
        lab.create("busybox", WEB, name="t-tiny", memory="1k")
    after = {c["name"] for c in lab.containers(all=True)}
    assert after - before == {"t-port"}, "a refused run leaves no container behind"
    assert not os.path.islink("/var/lib/labkit/names/t-port2")


def caps_of(text, line="CapEff:"):
    from labkit.course.security import decode_caps
    return sorted(decode_caps(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(line))))


def test_containers_get_dockers_default_capabilities_in_run_and_in_exec(lab):
    from labkit.wire.arch import DOCKER_DEFAULT_CAPS
    probe = ["sh", "-c", "grep CapEff /proc/self/status; echo 5 > /proc/sys/kernel/printk_ratelimit; echo rc=$?; "
                         "sleep 30"]
    c = lab.run_container("busybox", probe, name="t-caps", network=None)
    try:
        for _ in range(100):
            log = c.logs()
            if "rc=" in log:
                break
            time.sleep(0.05)
        assert caps_of(log) == sorted(DOCKER_DEFAULT_CAPS)
        assert "rc=1" in log and "Read-only file system" in log, "/proc/sys is read-only, as Docker mounts it"
        got = c.exec(["sh", "-c", "grep CapEff /proc/self/status; hostname other"])
        assert caps_of(got.stdout) == sorted(DOCKER_DEFAULT_CAPS), "exec joins with the container's capabilities"
        assert got.exit_code != 0 and "not permitted" in got.stderr.lower()
        assert c.inspect()["HostConfig"]["Privileged"] is False
    finally:
        c.rm(force=True)
    c = lab.run_container("busybox", ["sleep", "30"], name="t-caps2", network=None, cap_add=["SYS_ADMIN"],
                          cap_drop=["NET_RAW"])
    try:
        caps = caps_of(c.exec(["grep", "CapEff", "/proc/self/status"]).stdout)
        assert "CAP_SYS_ADMIN" in caps and "CAP_NET_RAW" not in caps and len(caps) == 14
        info = c.inspect()["HostConfig"]
        assert info["CapAdd"] == ["CAP_SYS_ADMIN"] and info["CapDrop"] == ["CAP_NET_RAW"]
    finally:
        c.rm(force=True)
    c = lab.run_container("busybox", ["sleep", "30"], name="t-caps3", network=None, privileged=True)
    try:
        assert "CAP_SYS_ADMIN" in caps_of(c.exec(["grep", "CapEff", "/proc/self/status"]).stdout)
        assert c.inspect()["HostConfig"]["Privileged"] is True
    finally:
        c.rm(force=True)
    with pytest.raises(InvalidSpec, match="unknown capability"):
        lab.create("busybox", ["true"], name="t-caps4", cap_add=["GODMODE"])
    assert "t-caps4" not in [x["name"] for x in lab.containers(all=True)], "nothing half-made"


def test_cli_cap_flags(tmp_path):
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--rm", "--network", "none", "--cap-drop", "ALL",
                          "--cap-add", "chown", "busybox", "grep", "CapEff", "/proc/self/status"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert caps_of(out.stdout) == ["CAP_CHOWN"]


@pytest.fixture
def loop_secret(tmp_path):
    """A loop device whose first bytes only the host wrote: what a container must not read."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"LABKIT-HOST-SECRET" + b"\0" * (1 << 20))
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True, check=True).stdout.strip()
    st = os.stat(dev)
    try:
        yield dev, os.major(st.st_rdev), os.minor(st.st_rdev)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_a_default_container_cannot_read_a_host_device_it_makes(lab, loop_secret, tmp_path):
    """Docker's defaults keep CAP_MKNOD; what stops the attack is that the node cannot be opened (nodev on the
    root, /dev and volumes). With --privileged the same commands read the host's disk: the test can fail."""
    dev, major, minor = loop_secret
    vol = tmp_path / "vol"
    vol.mkdir()
    attack = ("for d in /tmp/d /dev/d /vol/d; do mknod $d b %d %d && head -c 18 $d; echo \" rc=$?\"; done"
              % (major, minor))
    r = lab.run_container("busybox", ["sh", "-c", attack], name="t-mknod", volumes=[f"{vol}:/vol"], detach=False,
                          rm=True, network=None)
    out = r["logs"]
    assert "LABKIT-HOST-SECRET" not in out, out
    assert out.count("Permission denied") == 3, out
    priv = lab.run_container("busybox", ["sh", "-c", attack.replace("/tmp/d", "/tmp/p").replace("/dev/d", "/dev/p")
                                         .replace("/vol/d", "/vol/p")], name="t-mknod-priv", privileged=True,
                             volumes=[f"{vol}:/vol"], detach=False, rm=True, network=None)
    pout = priv["logs"]
    assert pout.count("LABKIT-HOST-SECRET") == 3, pout


def test_a_container_cannot_rewrite_the_host_interpreter_through_proc_self_exe(lab, tmp_path):
    """runc's CVE-2019-5736, labkit's flavour: the container's first process is exec'd by labkit's launcher, a
    Python. An image whose command is /proc/self/exe (with a Python library it ships, here a volume) would run
    the host's interpreter as the container's root and chmod it set-user-ID. The launcher runs from a sealed
    in-memory copy, so the chmod lands on the copy and a write is refused; the host's binary is unchanged."""
    import hashlib
    import sysconfig
    real = os.path.realpath(sys.executable)
    before = os.stat(real)
    digest = hashlib.sha256(open(real, "rb").read()).hexdigest()
    stdlib = sysconfig.get_paths()["stdlib"]
    # what an attacker's image would ship: the interpreter's loader and libraries, and a Python library
    ldd = subprocess.run(["ldd", real], capture_output=True, text=True, check=True).stdout
    libs = sorted({p for p in re.findall(r"(/\S+)", ldd)})
    volumes = sorted({f"{os.path.dirname(p)}:{os.path.dirname(p)}:ro" for p in libs if "ld-linux" not in p}
                     | {f"{p}:{p}:ro" for p in libs if "ld-linux" in p})
    volumes.append(f"{stdlib}:/py/lib/{os.path.basename(stdlib)}:ro")
    attack = ("import os\nos.chmod('/proc/self/exe', 0o4755)\nprint('chmod done')\n"
              "try:\n    open('/proc/self/exe', 'r+b').write(b'x')\n    print('write done')\n"
              "except OSError as e:\n    print('write refused', e.errno)\n")
    try:
        r = lab.run_container("busybox", ["/proc/self/exe", "-c", attack], name="t-selfexe", network=None,
                              env={"PYTHONHOME": "/py"}, volumes=volumes,
                              detach=False, rm=True)
        assert "chmod done" in r["logs"] and "write refused" in r["logs"], r["logs"]
        after = os.stat(real)
        assert (after.st_mode, after.st_mtime) == (before.st_mode, before.st_mtime)
        assert hashlib.sha256(open(real, "rb").read()).hexdigest() == digest
    finally:
        if os.stat(real).st_mode != before.st_mode:
            os.chmod(real, before.st_mode & 0o7777)


def test_an_image_symlink_cannot_steer_a_volume_onto_the_host(lab, tmp_path):
    """An image with /data -> /etc, run with -v DIR:/data/x, would have made /etc/x on the host before the
    mount; now the volume's way into the root is walked without following links, and refused."""
    mark = "labkit-vol-" + os.urandom(4).hex()
    lab.build(f"FROM busybox\nRUN ln -s /etc /data && ln -s /etc/{mark}-file /cfg\n", "t-symvol:v1")
    vol = tmp_path / "vol"
    vol.mkdir()
    (tmp_path / "f").write_text("x")
    try:
        for volume in (f"{vol}:/data/{mark}", f"{tmp_path / 'f'}:/cfg"):
            c = lab.create("t-symvol:v1", ["true"], name="t-symvol", network=None, volumes=[volume])
            try:
                with pytest.raises(LabkitError, match="symlink"):
                    c.start()
            finally:
                c.rm(force=True)
        assert not os.path.exists(f"/etc/{mark}") and not os.path.exists(f"/etc/{mark}-file")
    finally:
        lab.rmi("t-symvol:v1")


def test_extra_hosts_are_the_containers_own_etc_hosts_and_cannot_be_steered_onto_the_host(lab, tmp_path):
    """--add-host NAME:IP: a file of the container's own bound on /etc/hosts (lab 09 resolves service names
    so); an image whose /etc is a link to a host directory gets it refused, not written there."""
    from labkit.wire.specs import ContainerSpec
    spec = ContainerSpec(image="busybox", name="t-hosts", cmd=("sleep", "30"), network=None,
                         extra_hosts=("api:127.0.0.1", "demo_api:127.0.0.2"))
    lab.call("container.create", spec=spec.to_dict())
    lab.call("container.start", ref="t-hosts")
    out = lab.call("container.exec", ref="t-hosts", argv=["cat", "/etc/hosts"])["stdout"]
    assert "127.0.0.1\tapi\n" in out and "127.0.0.2\tdemo_api\n" in out
    assert lab.call("container.exec", ref="t-hosts", argv=["sh", "-c", "echo x >> /etc/hosts"])["exit_code"] != 0, \
        "read-only, as Docker's"
    assert lab.call("container.inspect", ref="t-hosts")["HostConfig"]["ExtraHosts"] == ["api:127.0.0.1",
                                                                                         "demo_api:127.0.0.2"]
    victim = tmp_path / "etc"
    victim.mkdir()
    lab.build(f"FROM busybox\nRUN rm -rf /etc && ln -s {victim} /etc\n", "t-symhosts:v1")
    try:
        lab.call("container.create", spec=ContainerSpec(image="t-symhosts:v1", name="t-symhosts", cmd=("true",),
                                                        network=None, extra_hosts=("api:127.0.0.1",)).to_dict())
        with pytest.raises(LabkitError, match="symlink"):
            lab.call("container.start", ref="t-symhosts")
        assert list(victim.iterdir()) == []
    finally:
        lab.call("container.rm", ref="t-symhosts", force=True)
        lab.rmi("t-symhosts:v1")
    with pytest.raises(InvalidSpec, match="not an IPv4"):
        ContainerSpec(extra_hosts=("api:999.1.1.1",))
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--rm", "--network", "none", "--add-host",
                          "api:10.1.2.3", "busybox", "cat", "/etc/hosts"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0 and "10.1.2.3\tapi" in out.stdout, out  # the CLI's --add-host, as docker run's
