"""labkit's daemon for real: started in the background, found by labkit.connect() and the CLI, killed with
SIGKILL under a running container (which goes on running, and the next daemon finds it), refused a second
time, root's alone, stopped by `labkit cleanup` (which then kills the containers' processes)."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import labkit
from labkit.agent import daemon
from labkit.wire.errors import Conflict, NotFound

from conftest import REPO

pytestmark = pytest.mark.privileged


def _cli(*args, env=None, check=True, timeout=120):
    res = subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=timeout, env=dict(os.environ, **(env or {})))
    if check and res.returncode != 0:
        raise AssertionError(f"labkit {' '.join(args)} exited {res.returncode}: {res.stdout}{res.stderr}")
    return res


@pytest.fixture
def running_daemon(lab):
    assert daemon.status() is None, "no daemon runs before the test"
    st = daemon.start()
    try:
        yield st
    finally:
        daemon.stop()
        for name in ("lk-dm-a", "lk-dm-b"):
            try:
                lab.container(name).rm(force=True)
            except NotFound:
                pass
    assert not os.path.exists(daemon.SOCKET) and not os.path.exists(daemon.PIDFILE)


def test_connect_and_the_cli_go_through_the_daemon_when_it_runs(running_daemon, lab, monkeypatch):
    monkeypatch.delenv("LABKIT_DAEMON", raising=False)
    via = labkit.connect("local")
    try:
        assert via.transport.hello["pid"] == running_daemon["pid"], "the daemon answered, not this process"
        assert via.target == "local"
        _cli("create", "--name", "lk-dm-a", "busybox", "sleep", "60")  # through the daemon too
        assert [c["name"] for c in via.containers(all=True)].count("lk-dm-a") == 1
        assert lab.container("lk-dm-a").status == "created", "what the daemon made is on the machine"
    finally:
        via.close()
    monkeypatch.setenv("LABKIT_DAEMON", "off")
    direct = labkit.connect("local")
    try:
        assert direct.transport.hello["pid"] == os.getpid(), "LABKIT_DAEMON=off: in-process"
    finally:
        direct.close()


def test_a_long_build_does_not_hold_up_the_daemons_other_requests(running_daemon, lab, monkeypatch):
    """A build (or a pull) keeps to the store's own lock: while one runs a slow RUN step, the same daemon
    creates, starts and removes a container; a prune meanwhile is refused at once (it would otherwise hold up
    every request behind the build, or take layers only the build knows of yet), and one after the build finds
    every layer of the image named."""
    import threading
    monkeypatch.delenv("LABKIT_DAEMON", raising=False)
    builder, other = labkit.connect("local"), labkit.connect("local")
    recipe = "FROM busybox\nCOPY page /page\nRUN sleep 8 && cat /page > /copied  # %s\n" % os.urandom(4).hex()
    got = {}

    def build():
        try:
            got["built"] = builder.build(recipe, "lk-dm-slow:v1", context={"page": "made during a prune"})
        except Exception as exc:  # noqa: BLE001 - reported below
            got["error"] = exc
    worker = threading.Thread(target=build)
    try:
        assert other.transport.hello["pid"] == running_daemon["pid"]
        worker.start()
        time.sleep(1.5)  # the RUN step sleeps now; the COPY layer below it is named by no image yet
        t0 = time.monotonic()
        c = other.create("busybox", ["true"], name="lk-dm-b", network=None)
        c.start()
        c.wait(30)
        c.rm()
        meanwhile = time.monotonic() - t0
        assert worker.is_alive(), f"the build ended before the container's run: it took {meanwhile:.1f} s"
        with pytest.raises(Conflict, match="store is busy"):
            other.prune(all_cache=True)
        worker.join(120)
        other.prune(all_cache=True)
        assert "error" not in got, got.get("error")
        layers = got["built"]["image"]["layers"]
        assert all(os.path.isdir(f"/var/lib/labkit/layers/sha256/{d.split(':')[1]}") for d in layers)
        out = lab.run_container("lk-dm-slow:v1", ["cat", "/copied"], detach=False, rm=True, network=None)
        assert out["logs"] == "made during a prune", out
    finally:
        worker.join(120)
        builder.close()
        other.close()
        if "lk-dm-slow:v1" in [i["ref"] for i in lab.images()]:
            lab.rmi("lk-dm-slow:v1")


def test_its_sockets_are_roots_alone(running_daemon):
    """0600 sockets in the root-only /run/labkit: another user is stopped (here by the directory already)."""
    for path in (daemon.SOCKET, daemon.DOCKER_SOCKET):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600, path
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1]); print('connected')")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", probe,
                          daemon.SOCKET], capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "connected" not in res.stdout, "another user cannot reach root's daemon"
    assert "Permission denied" in res.stderr


def test_a_second_daemon_is_refused_and_the_first_goes_on(running_daemon):
    res = subprocess.run([sys.executable, "-m", "labkit.agent.daemon"], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert res.returncode == 1 and f"already runs (pid {running_daemon['pid']})" in res.stderr, res.stderr
    assert daemon.answers() and daemon.status()["pid"] == running_daemon["pid"]


def test_sigkill_leaves_its_containers_running_and_the_next_daemon_finds_them(running_daemon, lab, monkeypatch):
    monkeypatch.delenv("LABKIT_DAEMON", raising=False)
    via = labkit.connect("local")
    try:
        c = via.create("busybox", ["sleep", "300"], name="lk-dm-b")
        c.start()
        pid = lab.container("lk-dm-b").inspect()["State"]["Pid"]
    finally:
        via.close()
    os.kill(running_daemon["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while daemon.status() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.status() is None
    info = lab.container("lk-dm-b").inspect()
    assert info["State"]["Running"] and info["State"]["Pid"] == pid, "the container runs on, the same process"
    # its socket is left behind: a client falls back to in-process instead of failing
    fallback = labkit.connect("local")
    try:
        assert fallback.transport.hello["pid"] == os.getpid()
        assert fallback.container("lk-dm-b").status == "running"
    finally:
        fallback.close()
    st = daemon.start()
    assert st["pid"] != running_daemon["pid"]
    again = labkit.connect("local")
    try:
        assert again.transport.hello["pid"] == st["pid"]
        assert again.container("lk-dm-b").inspect()["State"]["Pid"] == pid, "the new daemon finds it running"
        again.container("lk-dm-b").stop(timeout=1)
        assert lab.container("lk-dm-b").status.startswith("exited")
    finally:
        again.close()


def test_sigkill_in_the_middle_of_changes_loses_no_running_container_and_cleanup_removes_the_rest(lab, monkeypatch):
    """Containers made and started through the daemon while others are being made: SIGKILL lands mid-operation.
    Every container that was running runs on (same PID, still the supervisor's child, its exit still recorded),
    the next daemon lists them, and `labkit cleanup` leaves nothing, half-made containers included."""
    import threading
    from labkit.agent import supervisor
    monkeypatch.delenv("LABKIT_DAEMON", raising=False)
    st = daemon.start()
    via = labkit.connect("local")
    running = {}
    try:
        for i in range(3):
            c = via.create("busybox", ["sleep", "300"], name=f"lk-dm-run{i}", network="default" if i else None)
            c.start()
            running[c.id] = lab.container(c.id).inspect()["State"]["Pid"]
        busy = labkit.connect("local")
        errors = []

        def churn():  # changes in flight when the daemon dies
            try:
                for i in range(50):
                    busy.create("busybox", ["true"], name=f"lk-dm-churn{i}").start()
            except labkit.LabkitError as exc:
                errors.append(exc)
        t = threading.Thread(target=churn, daemon=True)
        t.start()
        time.sleep(0.5)
        os.kill(st["pid"], signal.SIGKILL)
        t.join(30)
        assert errors, "the daemon died under the churn"
    finally:
        via.close()
    deadline = time.monotonic() + 10
    while daemon.status() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    sup = supervisor.holders()
    for cid, pid in running.items():
        info = lab.container(cid).inspect()
        assert info["State"]["Running"] and info["State"]["Pid"] == pid, "it runs on, the same process"
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) in sup, "still the supervisor's child"
    again = daemon.start()
    try:
        via = labkit.connect("local")
        try:
            assert via.transport.hello["pid"] == again["pid"]
            names = {c["name"] for c in via.containers()}
            assert {f"lk-dm-run{i}" for i in range(3)} <= names, "the next daemon lists them running"
            via.container("lk-dm-run1").stop(timeout=0)
            assert via.container("lk-dm-run1").inspect()["State"]["ExitCode"] == 137, "its end still recorded"
        finally:
            via.close()
    finally:
        daemon.stop()
    _cli("cleanup", "--target", "local")
    dry = _cli("cleanup", "--dry-run", "--target", "local").stdout
    assert dry.strip() == "", f"cleanup left: {dry}"
    left = [c for c in lab.containers(all=True) if c["name"].startswith("lk-dm-")]
    assert not [c for c in left if c["status"].startswith("Up")], "no container of theirs runs"
    for c in left:  # (cleanup removes kernel objects; a container's files go with rm, as in Docker)
        lab.container(c["id"]).rm(force=True)


def test_cli_start_status_stop(lab):
    assert daemon.status() is None
    try:
        out = _cli("daemon", "start").stdout
        assert "DOCKER_HOST=unix:///run/labkit/docker.sock" in out
        st = daemon.status()
        assert f"pid {st['pid']}" in _cli("daemon", "status").stdout
        assert _cli("daemon", "start").stdout.count(f"pid {st['pid']}") == 1, "a second start finds the first"
    finally:
        out = _cli("daemon", "stop").stdout
    assert "stopped labkit's daemon" in out
    res = _cli("daemon", "status", check=False)
    assert res.returncode == 3 and "not running" in res.stdout


def test_labkit_cleanup_stops_the_daemon_and_removes_its_containers(lab, monkeypatch):
    monkeypatch.delenv("LABKIT_DAEMON", raising=False)
    st = daemon.start()
    try:
        via = labkit.connect("local")
        try:
            via.create("busybox", ["sleep", "300"], name="lk-dm-a").start()
        finally:
            via.close()
        dry = _cli("cleanup", "--dry-run", "--target", "local").stdout
        assert f"would stop labkit's daemon (pid {st['pid']})" in dry and daemon.status() is not None
        out = _cli("cleanup", "--target", "local").stdout
        assert f"stopped labkit's daemon (pid {st['pid']})" in out
        assert daemon.status() is None and not os.path.exists(daemon.SOCKET)
        assert lab.container("lk-dm-a").status != "running", "its process was killed"
    finally:
        daemon.stop()
        try:
            lab.container("lk-dm-a").rm(force=True)
        except NotFound:
            pass


def test_a_garbled_pid_file_is_no_daemon_and_signals_nothing(lab):
    assert daemon.status() is None
    os.makedirs(daemon.RUN_DIR, exist_ok=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that is surely not running now (were it reused, its start time would differ)
    for text in ("{", json.dumps({"pid": gone.pid, "starttime": 1}), json.dumps({"pid": os.getpid(), "starttime": 0})):
        with open(daemon.PIDFILE, "w") as f:
            f.write(text)
        assert daemon.status() is None, text
        assert daemon.stop() is None, "a pid that is not the daemon it recorded is never signalled"
    assert not os.path.exists(daemon.PIDFILE)
    for f in os.listdir(daemon.RUN_DIR):  # the garbled one, set aside for a human to read
        if f.startswith("labkitd.json.corrupt-"):
            os.unlink(os.path.join(daemon.RUN_DIR, f))


def test_one_request_on_labkits_own_wire_as_it_crossed_the_socket(lab):
    """Lab 06's look at labkit's wire: the daemon speaks first, then one JSON line each way, with the same id."""
    import json as _json
    with lab.daemon() as d:
        one = d.wire("container.ps", all=True)
    hello, request, answer = (_json.loads(one[k]) for k in ("hello", "request", "answer"))
    assert hello["hello"] == "labkit-agent" and hello["protocol"] >= 2
    assert request == {"id": 1, "method": "container.ps", "params": {"all": True}}
    assert answer["id"] == 1 and answer["ok"] is True and isinstance(answer["result"], list)
