"""The agent's state files: written atomically under unique names, read back defensively. Each test is an
attack or an accident: a truncated entry, a planted symlink, two writers at once, a recycled pid."""
import json
import os
import subprocess
import threading
import time

import pytest

from labkit.agent import engine, network, process, state, store, vm
from labkit.agent.runner import pid_starttime, same_process

pytestmark = pytest.mark.privileged


def test_write_json_is_atomic_private_and_never_follows_a_planted_link(tmp_path):
    target = tmp_path / "entry.json"
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    # every temp name a writer could pick is unpredictable; a symlink at the final name is replaced, not followed
    os.symlink(victim, target)
    state.write_json(str(target), {"a": 1})
    assert victim.read_text() == "keep me" and not os.path.islink(target)
    assert json.loads(target.read_text()) == {"a": 1} and (os.stat(target).st_mode & 0o777) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["entry.json", "victim"], "no temporary file is left"


def test_two_writers_at_once_never_share_a_temp_file(tmp_path):
    path = str(tmp_path / "img.json")
    errors = []

    def writer(n):
        try:
            for i in range(200):
                state.write_json(path, {"writer": n, "i": i, "pad": "x" * 5000})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    got = json.loads(open(path).read())  # whole, from one writer
    assert got["pad"] == "x" * 5000 and os.listdir(tmp_path) == ["img.json"]


def test_a_truncated_entry_is_set_aside_and_the_reader_goes_on(tmp_path, capsys):
    d = tmp_path / "procs"
    d.mkdir()
    (d / "good.json").write_text(json.dumps({"id": "good"}))
    (d / "cut.json").write_text('{"id": "cut", "pid": 12')
    (d / "list.json").write_text("[1, 2]")
    (d / "deep.json").write_text("[" * 200000 + "]" * 200000)
    got = state.read_dir(str(d))
    assert got == [("good", {"id": "good"})]
    left = sorted(os.listdir(d))
    assert "good.json" in left and len(left) == 4
    assert all(".corrupt-" in n for n in left if n != "good.json")
    err = capsys.readouterr().err
    assert "cut.json is not valid JSON" in err and "set aside" in err


def test_non_regular_and_huge_state_files_are_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    assert state.read_json(str(tmp_path / "fifo.json"), default="d") == "d"  # never blocks on a FIFO
    os.symlink("/dev/zero", tmp_path / "zero.json")
    assert state.read_json(str(tmp_path / "zero.json"), default="d") == "d"  # not followed, not read forever
    assert state.read_json(str(tmp_path / "missing.json"), default="d") == "d"


@pytest.fixture
def victim():
    """An unrelated process that a stale state entry names (as after a reboot or pid reuse)."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def test_cleanup_leaves_a_recycled_pid_alone(lab, victim):
    """State entries whose pid now belongs to someone else (start time differs): nothing is killed."""
    wrong = pid_starttime(victim.pid) + 12345
    state.write_json(f"{process.PROCS_DIR}/t-recycled.json",
                     {"id": "t-recycled", "pid": victim.pid, "starttime": wrong, "spec": {"action": "exec"}})
    rt = f"{engine.RUNTIME}/0123456789ab"
    state.write_json(f"{rt}/state.json", {"pid": victim.pid, "starttime": wrong, "monitor": victim.pid,
                                          "monitor_starttime": None})
    state.write_json(f"{vm.VM_RUN}/0badc0de.json", {"id": "0badc0de", "pid": victim.pid, "starttime": wrong,
                                                    "disk": "/etc/passwd", "dir": "/etc", "tap": "eth0"})
    try:
        assert not same_process(victim.pid, wrong) and same_process(victim.pid, pid_starttime(victim.pid))
        lab.cleanup()
        time.sleep(0.2)
        assert victim.poll() is None, "cleanup killed a process labkit did not start"
        assert os.path.exists("/etc/passwd") and os.path.isdir("/etc"), "a forged VM entry steered a deletion"
        assert not os.path.exists(f"{process.PROCS_DIR}/t-recycled.json")
        assert not os.path.exists(f"{vm.VM_RUN}/0badc0de.json")
    finally:
        for p in (f"{process.PROCS_DIR}/t-recycled.json", f"{rt}/state.json", f"{vm.VM_RUN}/0badc0de.json"):
            if os.path.exists(p):
                os.unlink(p)
        if os.path.isdir(rt):
            os.rmdir(rt)


def test_corrupt_entries_do_not_stop_cleanup_ps_or_prune(lab):
    made = {f"{process.PROCS_DIR}/t-cut.json": '{"id": "t-cut", "pid": ',
            f"{network.NET_DIR}/tcut.json": '{"spec": {"name": "tcut"',
            f"{vm.VM_RUN}/deadbeef.json": "{",
            f"{store.IMAGES}/t-cut/v1.json": '{"layers": ["sha256:',
            f"{store.CACHE}/{'0' * 64}.json": "[",
            f"{network.SYSCTL_STATE}": '{"net.ipv4.ip_forward": "1", "../../../etc/x": "1"',
            # valid JSON, forged: a bridge name that would go into `ip` and `nft` with a command after it
            f"{network.NET_DIR}/tforge.json": json.dumps({
                "spec": {"name": "tforge", "subnet": "10.217.0.0/24"}, "bridge": "lkbr-tforge\nflush ruleset",
                "gateway": "10.217.0.1", "allocations": {}, "ports": [], "members": {}}),
            f"{engine.roots.CONTAINERS_DIR}/0123456789cd/config.json": '{"id": "0123456789cd", "na'}
    for path, text in made.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    try:
        assert lab.processes() == [] or all(p["id"] != "t-cut" for p in lab.processes())
        assert all(c["id"] != "0123456789cd" for c in lab.containers(all=True))
        assert all(n["spec"]["name"] not in ("tcut", "tforge") for n in lab.networks())
        assert all(i["ref"] != "t-cut:v1" for i in lab.images())
        lab.cleanup()
        lab.call("image.prune")
        for path in made:
            assert not os.path.exists(path), f"{path} was neither read nor set aside"
            d = os.path.dirname(path)
            assert any(n.startswith(os.path.basename(path) + ".corrupt-") for n in os.listdir(d)), path
    finally:
        for path in made:
            d = os.path.dirname(path)
            for n in os.listdir(d) if os.path.isdir(d) else ():
                if n.startswith(os.path.basename(path)):
                    os.unlink(os.path.join(d, n))
        for d in (f"{store.IMAGES}/t-cut", f"{engine.roots.CONTAINERS_DIR}/0123456789cd"):
            if os.path.isdir(d):
                os.rmdir(d)


def test_private_directories_keep_other_users_out(lab, student):
    """The launcher's reports, process entries and container roots are root's alone: a local user can plant
    nothing there (the old report went through a predictable name in /tmp)."""
    lab.run_in(["true"], ["uts"])
    for d in (process.REPORTS_DIR, process.PROCS_DIR, store.LAYERS):
        assert os.stat(d).st_mode & 0o777 == 0o700, d
    plant = subprocess.run(["runuser", "-u", student.pw_name, "--", "ln", "-s", "/etc/shadow",
                            f"{process.REPORTS_DIR}/report-x.json"], capture_output=True, text=True)
    assert plant.returncode != 0 and "Permission denied" in plant.stderr
    assert not [n for n in os.listdir("/tmp") if n.startswith("labkit-report-")]
