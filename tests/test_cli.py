"""The `labkit` command line."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged


def labkit(*args):
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_doctor_prints_a_table():
    res = labkit("doctor", "--target", "local")
    assert res.returncode == 0, res.stderr
    assert "cgroups" in res.stdout and "namespaces" in res.stdout and "kvm" in res.stdout


def test_bad_target_exits_2_with_the_fix():
    res = labkit("doctor", "--target", "floppy://a")
    assert res.returncode == 2 and "fix:" in res.stderr and "ssh://" in res.stderr


def test_cleanup_dry_run():
    res = labkit("cleanup", "--target", "local", "--dry-run")
    assert res.returncode == 0, res.stderr


def test_assign_strips_solutions(tmp_path):
    res = labkit("assign", "--output", str(tmp_path))
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "02-namespaces.ipynb").read_text()
    assert "BEGIN SOLUTION" not in text and "box = lab.spawn(" not in text
    assert "box = None" in text


def test_run_it_gives_the_container_a_terminal(tmp_path):
    """`labkit run -it busybox sh` typed in a real terminal (tmux): a prompt, our input, the answer."""
    import shutil
    import time
    if not shutil.which("tmux"):
        pytest.fail("tmux is missing: scripts/setup.sh --dev installs it")
    session = "lk-test-it"
    cmd = f"{sys.executable} -m labkit.cli run -it --rm --name t-it --hostname inside --network none busybox sh"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", cmd], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        def screen():
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        for _ in range(100):
            if "#" in screen():
                break
            time.sleep(0.1)
        subprocess.run(["tmux", "send-keys", "-t", session, "echo answer-$((6*7)) from $(hostname)", "Enter"], check=True)
        for _ in range(100):
            if "answer-42 from inside" in screen():
                break
            time.sleep(0.1)
        assert "answer-42 from inside" in screen(), screen()
        subprocess.run(["tmux", "send-keys", "-t", session, "exit", "Enter"], check=True)
        for _ in range(100):
            if subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0:
                break
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    names = labkit(*["ps", "-a", "--target", "local"]).stdout
    assert "t-it" not in names, "--rm removed the container after the shell exited"
