"""Lab 06's local registry (labkit.agent.localregistry) for real: Debian's docker-registry started on 127.0.0.1,
read through its own API, the round trip tag → push → rmi → pull (layers already here not fetched again), and
stopped with what was pushed. Refusals as the attacks they stop: a port held by something that is not a registry,
a state file naming a process labkit did not start, a registry labkit did not start (left alone), API paths
outside the distribution API's read side."""
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from labkit.agent import cleanup as agent_cleanup
from labkit.agent import localregistry
from labkit.agent.runner import pid_fields
from labkit.agent.state import write_json
from labkit.wire.errors import Conflict, InvalidSpec

pytestmark = pytest.mark.privileged
REGISTRY = shutil.which("docker-registry", path="/usr/bin:/usr/sbin")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port():
    if not REGISTRY:
        pytest.fail("docker-registry is missing: scripts/setup.sh --dev installs it")
    assert localregistry.status() is None, "labkit's registry runs already: stop it before the tests"
    p = _free_port()
    yield p
    localregistry.stop(remove=True)


def _listening(port):
    """The local addresses something listens on with ``port`` (from /proc/net/tcp and tcp6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            addr, hexport = f[1].rsplit(":", 1)
            if f[3] == "0A" and int(hexport, 16) == port:
                out.add(addr)
    return out


def test_round_trip_through_a_registry_of_labkits_own(lab, port):
    """Started on 127.0.0.1 only, read through its API; a pull after the push fetches no layer this machine
    has; close() stops it and removes what was pushed, and cleanup then finds nothing of it."""
    with lab.registry(port=port) as reg:
        assert reg.started_here and reg.url == f"127.0.0.1:{port}"
        assert _listening(port) == {"0100007F"}, "the registry must listen on 127.0.0.1 only"
        assert ("registry", f"127.0.0.1:{port} (pid {reg.pid})") in agent_cleanup.plan()
        lab.build("FROM busybox\nRUN echo shared > /shared  # %s\n" % os.urandom(4).hex(), "t-lreg:v1")
        ref = f"{reg.url}/alice/web:v1"
        try:
            lab.tag("t-lreg:v1", ref)
            pushed = lab.push(ref)
            assert reg.catalog() == ["alice/web"] and reg.tags("alice/web") == ["v1"]
            held = reg.digest("alice/web", "v1")
            assert held == pushed.facts["manifest"]
            lab.rmi(ref)
            pulled = lab.pull(ref)
            assert pulled.facts["digest"] == held and lab.image(ref)["source"]["digest"] == held
            assert pulled.facts["layers_fetched"] == [] and len(pulled.facts["layers_present"]) == 2
            assert [r["name"] for r in lab.search("alice", registry=reg.url)] == [f"{reg.url}/alice/web"]
            # the grader's check decides from the registry and the store, with the pull's own record
            from labkit.course import checks
            assert checks.shared_through_registry(lab, ref, pulled, origin="t-lreg:v1")[0] is True
            assert checks.shared_through_registry(lab, ref.replace("alice", "bob"), pulled)[0] == 0.2
            # pulled again while it is here: Docker's "Image is up to date", nothing fetched, no round trip
            same = lab.pull(ref)
            assert same.facts["up_to_date"] is True and same.facts["layers_fetched"] == [] and \
                not any(st.get("kind") == "http" and "/blobs/" in st.get("url", "") for st in same["steps"])
            assert same.facts["digest"] == held and pulled.facts["up_to_date"] is False
            assert checks.shared_through_registry(lab, ref, same)[0] == 0.8
            said = subprocess.run([sys.executable, "-m", "labkit.cli", "pull", "--target", "local", ref],
                                  capture_output=True, text=True, timeout=120)
            assert said.returncode == 0 and said.stdout.splitlines() == [
                f"Digest: {held}", f"Status: Image is up to date for {ref}"], said
            # without its own layer here (busybox's stays: the busybox image has it), a pull fetches that one
            lab.rmi(ref)
            lab.rmi("t-lreg:v1")
            lab.prune(all_cache=True)
            again = lab.pull(ref)
            assert len(again.facts["layers_present"]) == 1 and len(again.facts["layers_fetched"]) == 1
            assert checks.shared_through_registry(lab, ref, again)[0] == 0.8
        finally:
            for r in (ref, "t-lreg:v1"):
                if r in [i["ref"] for i in lab.images()]:
                    lab.rmi(r)
    assert localregistry.status() is None and not os.path.exists(localregistry.DIR)
    assert not any(k.startswith("registry") for k, _ in agent_cleanup.plan())


def test_the_registry_runs_as_its_service_user_and_owns_only_its_data(lab, port, tmp_path):
    """docker-registry parses what anyone on the machine sends it: it runs as Debian's docker-registry user with
    no supplementary group, owns DIR/data and nothing else; its config, log and state stay root's, so the
    server, taken over, can neither rewrite where it listens nor what labkit records of it. Data a registry
    left as another owner is handed over when it starts again."""
    import pwd
    want = pwd.getpwnam("docker-registry")
    os.makedirs(f"{localregistry.DIR}/data/docker/registry", exist_ok=True)  # as a registry run as root left it
    # what a registry process of that user could leave to be handed over: a link to a file of root's elsewhere
    # (a hard link, where protected_hardlinks is off), a symbolic link to another
    roots = f"{localregistry.DIR}/roots-own"  # (on the data's own filesystem, as a hard link must be)
    with open(roots, "w") as f:
        f.write("root's own")
    os.link(roots, f"{localregistry.DIR}/data/docker/hard")
    os.symlink("/etc/shadow", f"{localregistry.DIR}/data/docker/soft")
    with lab.registry(port=port) as reg:
        status = dict(ln.split(":", 1) for ln in open(f"/proc/{reg.pid}/status").read().splitlines() if ":" in ln)
        assert status["Uid"].split() == [str(want.pw_uid)] * 4 and status["Gid"].split() == [str(want.pw_gid)] * 4
        assert status["Groups"].strip() == "" and status["CapEff"].strip() == "0" * 16
        lab.build("FROM busybox\nRUN echo mine > /mine  # %s\n" % os.urandom(4).hex(), "t-lreg-user:v1")
        ref = f"{reg.url}/carol/web:v1"
        try:
            lab.tag("t-lreg-user:v1", ref)
            lab.push(ref)  # what it writes is its own
        finally:
            for r in (ref, "t-lreg-user:v1"):
                lab.rmi(r)
        assert os.stat(roots).st_uid == 0 and os.stat("/etc/shadow").st_uid == 0
        os.unlink(f"{localregistry.DIR}/data/docker/hard")
        os.unlink(roots)
        for top, dirs, files in os.walk(f"{localregistry.DIR}/data"):
            for name in [top] + [os.path.join(top, n) for n in dirs + files]:
                assert os.lstat(name).st_uid == want.pw_uid, name
        for name in ("config.yml", "registry.log", "state.json"):
            st = os.lstat(f"{localregistry.DIR}/{name}")
            assert st.st_uid == 0 and not st.st_mode & 0o022, name
        assert os.stat(localregistry.DIR).st_uid == 0 and os.stat(localregistry.DIR).st_mode & 0o777 == 0o711
        probe = subprocess.run(["setpriv", f"--reuid={want.pw_uid}", f"--regid={want.pw_gid}", "--clear-groups",
                                "sh", "-c", f"echo x >> {localregistry.DIR}/config.yml"], capture_output=True, text=True)
        assert probe.returncode != 0 and "ermission denied" in probe.stderr, probe
        # a process the registry started and left behind (a taken-over registry would): it is in the registry's
        # cgroup, and stopping the registry ends it too, so that nothing of that user's listens in its place
        from labkit.agent import cgroups
        assert reg.pid in cgroups.pids(localregistry.CGROUP)
        left = subprocess.Popen(["setpriv", f"--reuid={want.pw_uid}", f"--regid={want.pw_gid}", "--clear-groups",
                                 "sleep", "300"], start_new_session=True)
        for f in cgroups.procs_files(localregistry.CGROUP):
            with open(f, "w") as w:
                w.write(str(left.pid))
    assert left.wait(timeout=15) == -9, "stopping the registry ends what it left running"


def test_a_port_held_by_something_else_is_refused_and_nothing_starts(lab, port):
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"not a registry")

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", port), Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(Conflict) as err:
            lab.registry(port=port)
        assert "not a registry" in str(err.value) and "another port" in err.value.fix
        assert localregistry.status() is None
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_registry_labkit_did_not_start_is_used_and_left_running(lab, port):
    d = tempfile.mkdtemp(prefix="labkit-test-registry-")
    with open(f"{d}/config.yml", "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    theirs = subprocess.Popen([REGISTRY, "serve", f"{d}/config.yml"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while localregistry._is_registry(port) is not True and time.monotonic() < end:
            time.sleep(0.05)
        with lab.registry(port=port) as reg:
            assert not reg.started_here and reg.pid is None
            assert reg.catalog() == []
        assert theirs.poll() is None, "closing the handle stopped a registry labkit did not start"
        assert localregistry.stop(remove=True)["stopped"] is None
        assert theirs.poll() is None and os.path.isfile(f"{d}/config.yml"), "labkit's stop touched another registry"
    finally:
        theirs.terminate()
        theirs.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_a_state_file_naming_another_process_is_never_signalled(port):
    """A state entry whose pid is now another process (recycled, or written to mislead) names nobody."""
    victim = subprocess.Popen(["sleep", "60"])
    try:
        entry = pid_fields(victim.pid)
        os.makedirs(localregistry.DIR, mode=0o700, exist_ok=True)
        write_json(localregistry.STATE, {**entry, "starttime": entry["starttime"] + 1, "port": port})
        assert localregistry.status() is None
        assert localregistry.stop(remove=True)["stopped"] is None
        time.sleep(0.1)
        assert victim.poll() is None, "stop signalled a process labkit did not record"
        assert not os.path.exists(localregistry.DIR)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


@pytest.mark.parametrize("path", ["/etc/passwd", "/v2/../../etc/passwd", "http://example.com/v2/_catalog",
                                  "/v2/alice/web/blobs/sha256:00", "/v2/_catalog?n=1&last=x", "/v2/Alice/tags/list",
                                  "/v2/a/manifests/v1/../../x", "/v2/_catalog\r\nHost: x"])
def test_only_the_read_side_of_the_distribution_api_is_asked(path):
    with pytest.raises(InvalidSpec):
        localregistry.get(path, port=5000)


@pytest.mark.parametrize("bad", [22, 0, 70000, "5000", True])
def test_ports_are_checked(bad):
    with pytest.raises(InvalidSpec):
        localregistry.get("/v2/_catalog", port=bad)


def test_a_registry_another_user_runs_is_not_adopted(lab, port):
    """A local user who binds the port first must not become "the course's registry" (its images would be run)."""
    d = tempfile.mkdtemp(prefix="labkit-test-registry-")
    os.chmod(d, 0o777)
    with open(f"{d}/config.yml", "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    theirs = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", REGISTRY, "serve",
                               f"{d}/config.yml"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while localregistry._is_registry(port) is not True and time.monotonic() < end:
            time.sleep(0.05)
        with pytest.raises(Conflict) as err:
            lab.registry(port=port)
        assert "another user (uid 65534)" in str(err.value)
    finally:
        theirs.terminate()
        theirs.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_an_answer_that_trickles_is_cut_off(port):
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.5)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t = time.monotonic()
        with pytest.raises(Exception) as err:
            localregistry.get("/v2/_catalog", port=port)
        assert time.monotonic() - t < 8 and "no registry answers" in str(err.value)
    finally:
        srv.shutdown()
        srv.server_close()
