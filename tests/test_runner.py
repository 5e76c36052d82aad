"""The one choke point for running commands."""
import errno

import pytest

from labkit.agent import kernel
from labkit.agent.runner import Recorder, run
from labkit.wire.errors import CommandFailed, CommandTimeout, InvalidSpec, MechanismError


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
