"""The `labkit` command line."""
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
