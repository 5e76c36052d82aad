"""The containers' supervisor for real: one process is the parent of every container's PID 1 (no labkit process
per container), it writes each exit status (a code, a signal, a program that could not run), it outlives the
command that started a container, it refuses a request for files that are not a container's own, it ends by
itself when idle, and a container goes on (and can still be stopped) when the supervisor itself is killed."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from labkit.agent import engine, supervisor
from labkit.wire.errors import MechanismError, NotFound

from conftest import REPO

pytestmark = pytest.mark.privileged


@pytest.fixture(autouse=True)
def tidy(lab):
    yield
    for c in lab.containers(all=True):
        if c["name"].startswith("t-sv"):
            lab.container(c["id"]).rm(force=True)
    for n in lab.networks():
        if n["spec"]["name"] == "default" and not n["members"]:
            lab.call("net.remove", name="default")


def _supervisor():
    holders = supervisor.holders(supervisor.identity())  # (this code's, in this mount namespace)
    assert len(holders) == 1, f"one supervisor holds the lock: {holders}"
    return holders[0]


def _ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _labkit_processes():
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if "labkit.agent" in cmd:
                out.append((int(p), cmd))
    return out


def test_every_container_is_the_supervisors_child_and_no_labkit_process_is_added_per_container(lab):
    before = _labkit_processes()
    cs = [lab.create("busybox", ["sleep", "300"], name=f"t-sv{i}", network=None if i % 2 else "default")
          for i in range(4)]
    for c in cs:
        c.start()
    sup = _supervisor()
    for c in cs:  # with a network (launcher, waiter, PID 1) and without (launcher, PID 1): the same end
        assert _ppid(c.inspect()["State"]["Pid"]) == sup, "the container's PID 1 is the supervisor's child"
    new = [p for p in _labkit_processes() if p not in before and p[0] != sup and "agent.forkserver" not in p[1]]
    assert new == [], f"no labkit process per container (this agent's own fork server aside): {new}"


def test_the_program_starts_with_no_signal_ignored(lab):
    """Python ignores SIGPIPE and SIGXFSZ; a container's program (and an exec'd one) must not inherit that, or
    `yes | head -1` would never end."""
    c = lab.create("busybox", ["sh", "-c", "grep SigIgn /proc/self/status; yes | head -n 1; sleep 300"],
                   name="t-sv-sig", network=None)
    c.start()
    deadline = time.monotonic() + 10
    while "y" not in c.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.logs().split()[:3] == ["SigIgn:", "0000000000000000", "y"]
    assert c.exec(["grep", "SigIgn", "/proc/self/status"]).stdout.split() == ["SigIgn:", "0000000000000000"]


def test_exit_codes_signals_and_a_program_that_cannot_run(lab):
    c = lab.create("busybox", ["sh", "-c", "echo bye; exit 3"], name="t-sv-code", network=None)
    c.start()
    assert c.wait()["exit_code"] == 3
    assert c.logs().strip().endswith("bye"), "its output went straight to its log"
    k = lab.create("busybox", ["sleep", "300"], name="t-sv-kill")
    k.start()
    os.kill(k.inspect()["State"]["Pid"], signal.SIGKILL)
    assert k.wait()["exit_code"] == 137
    ex = json.load(open(f"{engine.RUNTIME}/{k.id}/exit.json"))
    assert ex["signal"] == "SIGKILL"

    def member():
        return [m for n in lab.networks() for m in n["members"] if k.id in json.dumps(m)]
    deadline = time.monotonic() + 10  # (the exit status is written first, the network undone right after)
    while member() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not member(), "its veth went with it"
    for argv, code in ((["/no/such/program"], 127), (["/etc"], 126)):
        bad = lab.create("busybox", argv, name=f"t-sv-{code}", network=None)
        with pytest.raises(MechanismError) as err:
            bad.start()
        assert err.value.details.get("exit_code") == code
        assert bad.wait()["exit_code"] == code, "ps -a and wait show Docker's code"


def test_a_container_outlives_the_command_that_started_it_and_the_supervisor_reaps_it(lab):
    res = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "-d", "--target", "local", "--name", "t-sv-cli",
                          "--network", "none", "busybox", "sleep", "300"], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, LABKIT_DAEMON="off"), timeout=120)
    assert res.returncode == 0, res.stderr
    c = lab.container("t-sv-cli")
    assert c.status == "running"
    assert _ppid(c.inspect()["State"]["Pid"]) == _supervisor()
    c.stop(timeout=1)
    assert c.inspect()["State"]["ExitCode"] == 137  # sleep as PID 1 ignores SIGTERM: killed


def test_a_request_for_files_that_are_not_a_containers_own_is_refused(lab):
    lab.create("busybox", ["true"], name="t-sv-probe", network=None).start()  # a supervisor runs
    _supervisor()
    for watch in ({"owner": "0123456789ab", "start": "/etc/x.json", "exit": "/etc/passwd", "network": None},
                  {"owner": "../../etc", "start": "a", "exit": "b"},
                  {"owner": "0123456789ab", "start": f"{engine.RUNTIME}/0123456789ab/start.json",
                   "exit": f"{engine.RUNTIME}/0123456789ab/exit.json", "network": "Bad Name"}):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(supervisor.paths()["socket"])
        null = os.open(os.devnull, os.O_RDWR)
        try:
            socket.send_fds(conn, [json.dumps({"argv": ["x"], "watch": watch}).encode()], [null, null, null])
            conn.settimeout(10)
            assert conn.recv(100) == b"", f"no launcher forked for {watch}"
        finally:
            os.close(null)
            conn.close()


def test_it_ends_when_idle_and_the_next_start_brings_it_back(lab):
    supervisor.stop()
    deadline = time.monotonic() + 10
    while supervisor.holders() and time.monotonic() < deadline:
        time.sleep(0.05)
    from labkit.agent.runner import start_helper
    starter = start_helper("supervisor", "--idle", "1", "--identity", supervisor.identity(), stdout=subprocess.PIPE)
    assert starter.stdout.readline().strip() == b"ready"
    starter.wait()
    short = _supervisor()
    c = lab.create("busybox", ["sleep", "2"], name="t-sv-idle", network=None)
    c.start()
    assert _ppid(c.inspect()["State"]["Pid"]) == short
    time.sleep(1.5)
    assert supervisor.holders(supervisor.identity()) == [short], "a container to reap keeps it"
    assert c.wait()["exit_code"] == 0
    deadline = time.monotonic() + 10
    while supervisor.holders(supervisor.identity()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not supervisor.holders(supervisor.identity()) and not os.path.exists(supervisor.paths()["socket"]), "it ended by itself"
    c.start()
    assert supervisor.holders(supervisor.identity()) and supervisor.holders(supervisor.identity()) != [short], "a new one for the next start"


def test_a_killed_supervisor_leaves_its_containers_running_and_stop_still_works(lab):
    c = lab.create("busybox", ["sleep", "300"], name="t-sv-orphan", network=None)
    c.start()
    pid = c.inspect()["State"]["Pid"]
    os.kill(_supervisor(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while supervisor.holders(supervisor.identity()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.status == "running" and c.inspect()["State"]["Pid"] == pid
    started = time.monotonic()
    c.stop(timeout=1)
    assert time.monotonic() - started < 8, "stop saw the process gone without an exit record"
    assert c.status == "exited"
    with pytest.raises(NotFound):
        lab.container("t-sv-none").inspect()


def test_a_supervisor_of_other_code_is_left_alone_and_one_of_this_code_starts_beside_it(lab):
    """After labkit is updated, the old supervisor keeps what it holds; containers started now go to a new one."""
    from labkit.agent.runner import start_helper
    other = "0123456789ab-" + supervisor.identity().split("-")[1]
    assert other != supervisor.identity()
    starter = start_helper("supervisor", "--identity", other, "--idle", "2", stdout=subprocess.PIPE)
    assert starter.stdout.readline().strip() == b"ready"
    starter.wait()
    old = supervisor.holders(other)
    assert len(old) == 1
    c = lab.create("busybox", ["sleep", "300"], name="t-sv-beside", network=None)
    c.start()
    mine = supervisor.holders(supervisor.identity())
    assert len(mine) == 1 and mine != old and _ppid(c.inspect()["State"]["Pid"]) == mine[0]
    assert set(old + mine) <= set(supervisor.holders()), "both are found (cleanup stops both)"
    deadline = time.monotonic() + 10
    while supervisor.holders(other) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not supervisor.holders(other), "the old one, idle, ended by itself"


def test_a_client_in_another_mount_namespace_gets_a_supervisor_of_its_own(lab):
    """A container's root is mounted where its client runs: `labkit run` inside `unshare -m` (as a test of the lab
    without /boot does) must not hand its launches to the host's supervisor, nor leave the host one of its own."""
    lab.create("busybox", ["true"], name="t-sv-host", network=None).start()  # the host's supervisor runs
    host = supervisor.holders(supervisor.identity())
    script = ('exec "$@"')
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", sys.executable,
                          "-m", "labkit.cli", "run", "--rm", "--network", "none", "--target", "local", "busybox",
                          "cat", "/etc/os-release"], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=dict(os.environ, LABKIT_DAEMON="off"))
    assert res.returncode == 0 and "labkit busybox" in res.stdout, res.stderr
    assert supervisor.holders(supervisor.identity()) == host, "the host's supervisor is the one it was"
    c = lab.create("busybox", ["cat", "/etc/os-release"], name="t-sv-after", network=None)
    c.start()
    assert c.wait()["exit_code"] == 0 and "labkit busybox" in c.logs(), "and the host's containers still run"
