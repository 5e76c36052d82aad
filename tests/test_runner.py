"""The one choke point for running commands."""
import pytest

from labkit.agent.runner import Recorder, run
from labkit.wire.errors import CommandFailed, CommandTimeout, InvalidSpec


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
