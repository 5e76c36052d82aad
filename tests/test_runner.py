"""The one choke point for running commands."""
import errno
import os
import subprocess
import time

import pytest

from labkit.agent import kernel, process
from labkit.agent.runner import (SAFE_PATH, Recorder, helper_argv, pid_fields, pid_starttime, proc_stat,
                                 recorded_process, run, same_process, start, wait_gone)
from labkit.wire.errors import CommandFailed, CommandTimeout, InvalidSpec, MechanismError
from labkit.wire.specs import ProcessSpec


def test_result_carries_everything():
    r = run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n") and r.duration > 0


def test_failure_shows_command_code_and_stderr_tail():
    with pytest.raises(CommandFailed) as err:
        run(["sh", "-c", "echo boom >&2; exit 4"])
    assert "exited with 4" in str(err.value) and "boom" in str(err.value)


def test_missing_program_and_timeout_and_strings():
    with pytest.raises(CommandFailed) as err:
        run(["labkit-no-such-program"])
    assert err.value.exit_code == 127 and "install" in err.value.fix
    with pytest.raises(CommandTimeout):
        run(["sleep", "5"], timeout=0.2)
    with pytest.raises(InvalidSpec, match="list of arguments"):
        run("ls -l")


def test_start_hands_back_the_child_with_runs_rules():
    rec = Recorder("x")
    proc = start(["sh", "-c", 'echo "$PATH"; read line; echo "got $line"'], stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, recorder=rec)
    out, _ = proc.communicate(b"hello\n", timeout=10)
    assert out.decode().splitlines() == [SAFE_PATH, "got hello"] and proc.returncode == 0
    assert rec.steps == [{"kind": "command", "argv": proc.args, "exit_code": None, "stdout": "", "stderr": "",
                          "duration": 0}]
    for new_session in (True, False):
        child = start(["sleep", "30"], new_session=new_session)
        try:
            assert os.getsid(child.pid) == (child.pid if new_session else os.getsid(0))
        finally:
            child.kill()
            child.wait()
    with pytest.raises(CommandFailed) as err:
        start(["labkit-no-such-program"], recorder=rec)
    assert err.value.exit_code == 127 and "install" in err.value.fix and len(rec.steps) == 1
    with pytest.raises(InvalidSpec, match="list of arguments"):
        start("sleep 1")


def test_helpers_run_from_the_sealed_interpreter(monkeypatch):
    argv, fds = helper_argv("launch", "a", 1)
    assert argv == [f"/proc/self/fd/{fds[0]}", "-m", "labkit.agent.launch", "a", "1"]
    assert os.readlink(argv[0]).startswith("/memfd:labkit-python")
    spec = ProcessSpec(argv=("sh", "-c", "echo $PATH"), namespaces=("uts",), look=False)
    monkeypatch.setenv("LABKIT_REQUIRE_FORKSERVER", "1")
    for fresh in ("1", "0"):  # a fresh launcher (start_helper), then through the fork server (started the same way)
        monkeypatch.setenv("LABKIT_NO_FORKSERVER", fresh)
        res = process.run(spec, timeout=30)
        assert res["exit_code"] == 0 and res["stdout"].strip(), res


def test_recorder_keeps_failed_steps_too():
    rec = Recorder("x")
    rec.run(["true"])
    rec.run(["false"], check=False)
    assert [s["exit_code"] for s in rec.steps] == [0, 1]


def test_syscall_steps_have_one_shape():
    rec = Recorder("x")
    ok = rec.syscall("kill", [42, "SIGTERM"])
    assert ok == {"kind": "syscall", "call": "kill", "args": [42, "SIGTERM"], "result": 0, "errno": None,
                  "duration": 0}
    assert list(ok) == ["kind", "call", "args", "result", "errno", "duration"]
    failed = rec.syscall("chroot", ["'/nope'"], -1, errno.ENOENT, 0.5)
    assert (failed["result"], failed["errno"], failed["duration"]) == (-1, "ENOENT", 0.5)
    assert rec.syscall("x", errno="EPERM")["errno"] == "EPERM" and rec.syscall("x", errno=0)["errno"] is None
    extra = rec.syscall("prctl", ["PR_CAPBSET_DROP", "1 capabilities"], dropped=["CAP_SYS_ADMIN"], kept=[])
    assert list(extra)[-2:] == ["dropped", "kept"] and extra["dropped"] == ["CAP_SYS_ADMIN"]
    assert rec.steps[0] is ok and rec.steps[1] is failed and rec.steps[-1] is extra


def test_kernel_records_its_syscalls_through_the_recorder():
    rec = Recorder("x")
    with pytest.raises(MechanismError):
        kernel.chdir("/labkit-no-such-dir", rec=rec)  # os-level call
    with pytest.raises(MechanismError):
        kernel.umount2("/labkit-no-such-dir", rec=rec)  # ctypes-level call
    (chdir, umount) = rec.steps
    assert (chdir["kind"], chdir["call"], chdir["result"], chdir["errno"]) == ("syscall", "chdir", -1, "ENOENT")
    assert (umount["call"], umount["result"], umount["errno"]) == ("umount2", -1, "ENOENT")
    assert list(umount) == list(chdir) == ["kind", "call", "args", "result", "errno", "duration"]


def _zombie(pid):
    for _ in range(500):
        if (proc_stat(pid) or ["?"])[0] == "Z":
            return True
        time.sleep(0.01)
    return False


def test_a_reaped_childs_pid_is_not_the_same_process(tmp_path):
    odd = tmp_path / "x) 1 2 ("  # a command name that looks like the end of one, to trip naive parsing
    odd.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(odd), "30"])
    try:
        started = pid_starttime(child.pid)
        assert isinstance(started, int) and proc_stat(child.pid)[1] == str(os.getpid())
        assert same_process(child.pid, started) and not same_process(child.pid, started + 1)
        entry = {"id": "t", **pid_fields(child.pid), **pid_fields(child.pid, "monitor")}
        assert entry == {"id": "t", "pid": child.pid, "starttime": started, "monitor": child.pid,
                         "monitor_starttime": started}
        assert recorded_process(entry) == recorded_process(entry, "monitor") == child.pid
        assert not wait_gone(child.pid, started, 0.1)
    finally:
        child.kill()
    assert _zombie(child.pid)
    assert not same_process(child.pid, started) and recorded_process(entry) is None  # ended, not yet reaped
    child.wait()
    assert not same_process(child.pid, started) and recorded_process(entry) is None  # reaped: the pid is free
    assert wait_gone(child.pid, started, 0)


def test_wait_gone_sees_a_process_end_and_odd_entries_are_no_process():
    child = subprocess.Popen(["sleep", "0.2"])
    started = pid_starttime(child.pid)
    t = time.monotonic()
    assert wait_gone(child.pid, started, 10) and time.monotonic() - t < 5
    child.wait()
    for pid, st in ((None, started), (0, 0), (-1, 0), (True, started), (str(os.getpid()), pid_starttime(os.getpid())),
                    (os.getpid(), None)):
        assert not same_process(pid, st)
    assert same_process(os.getpid(), pid_starttime(os.getpid()))
    assert pid_fields(None, "waiter") == {"waiter": None, "waiter_starttime": None}
    assert recorded_process({}) is None and recorded_process({"pid": os.getpid(), "starttime": "1"}) is None
