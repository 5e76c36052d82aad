"""The lab command's machinery: `python -m labkit` is the CLI, `labkit scores` reads an output folder back,
the lab's install step brings a VM kernel where /boot has none, and lab 07 runs to the end on a target that
cannot boot a VM (its VM questions score zero with the target's reason)."""
import json
import os
import subprocess
import sys

import pytest

from labkit import cli
from labkit.wire import protocol
from labkit.course.grading import MIME
from labkit.course.runbook import course_notebooks, read_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_m_labkit_is_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "labkit", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"labkit {protocol.VERSION}"
    helped = subprocess.run([sys.executable, "-m", "labkit", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "doctor" in helped.stdout and "scores" in helped.stdout


def _executed(path, scores, exception=False):
    cells = [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [
        {"output_type": "display_data", "data": {MIME: s, "text/plain": "x"}, "metadata": {}}]} for s in scores]
    nb = {"cells": cells, "metadata": {"papermill": {"duration": 1.5, "exception": exception}}, "nbformat": 4,
          "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


def _q(q, got, out_of):
    return {"question": q, "points": got, "max_points": out_of, "passed": got >= out_of}


def test_scores_require_full_points_from_every_notebook(tmp_path, capsys):
    _executed(tmp_path / "00-setup.ipynb", [_q("00.1", 2, 2), _q("total", 2, 2)])
    _executed(tmp_path / "01-chroot.ipynb", [_q("01.1", 3, 3), _q("01.2", 1, 2), _q("total", 4, 5)])
    assert cli.main(["scores", str(tmp_path)]) == 0, "without --require-full a short notebook is reported, not fatal"
    assert cli.main(["scores", str(tmp_path), "--require-full"]) == 1
    out = capsys.readouterr()
    assert "01.2 1/2" in out.out and "not full points: 01-chroot.ipynb" in out.err
    _executed(tmp_path / "01-chroot.ipynb", [_q("01.1", 3, 3), _q("01.2", 2, 2), _q("total", 5, 5)])
    assert cli.main(["scores", str(tmp_path), "--require-full"]) == 0
    # every course notebook must be there with --all; a missing one is named
    assert cli.main(["scores", str(tmp_path), "--require-full", "--all"]) == 1
    missing = [r for r in read_runs(str(tmp_path), expected=course_notebooks()) if r.error]
    assert {r.name for r in missing} == set(course_notebooks()) - {"00-setup.ipynb", "01-chroot.ipynb"}
    # a notebook papermill marked as failed is not full, even with its points
    _executed(tmp_path / "00-setup.ipynb", [_q("00.1", 2, 2), _q("total", 2, 2)], exception=True)
    assert cli.main(["scores", str(tmp_path), "--require-full"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_scores_of_an_empty_folder_say_what_to_do(tmp_path, capsys):
    assert cli.main(["scores", str(tmp_path)]) == 2
    assert "labkit lab" in capsys.readouterr().err


def _without_boot(argv, **kw):
    """Run argv in a private mount namespace whose /boot is empty: a target where no VM kernel is found."""
    script = 'mount -t tmpfs -o size=1m,mode=755 labkit-test-noboot /boot && exec "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
                          capture_output=True, text=True, **kw)


@pytest.mark.privileged
@pytest.mark.slow
def test_the_lab_install_brings_a_vm_kernel_when_boot_has_none():
    """provision.sh (which scripts/setup.sh runs for the lab command) installs the distribution's VM kernel
    when /boot has none, and leaves a /boot that has one alone."""
    import platform
    out = _without_boot(["bash", os.path.join(REPO, "vagrant", "provision.sh"), REPO], timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    want = {"x86_64": "linux-image-cloud-amd64", "aarch64": "linux-image-cloud-arm64"}[platform.machine()]
    assert f"installing {want}" in out.stdout, out.stdout
    again = subprocess.run(["bash", os.path.join(REPO, "vagrant", "provision.sh"), REPO], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "/boot has no kernel" not in again.stdout, again.stdout


@pytest.mark.privileged
@pytest.mark.slow
def test_lab_07_runs_to_the_end_on_a_target_without_a_vm(tmp_path, lab):
    name = "07-containers-vs-vms.ipynb"
    out = _without_boot([sys.executable, "-m", "labkit", "lab", "--target", "local", "--output", str(tmp_path), name],
                        cwd=REPO, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [run] = read_runs(str(tmp_path))
    assert run.error is None
    by_q = {s["question"]: s for s in run.questions}
    for q in ("07.1 whose kernel", "07.2 the harness", "07.3 read the numbers"):
        assert by_q[q]["points"] == 0, by_q[q]
        assert "cannot boot the VM" in by_q[q]["feedback"] and "/boot" in by_q[q]["feedback"], by_q[q]
    assert "07.1 whose kernel" in out.stdout and "short" in out.stdout
    # the containers were measured; the VM's columns say why they are missing
    import pandas as pd
    summary = pd.read_csv(tmp_path / "bench-summary.csv")
    assert {"native", "container"} <= set(summary["case"]) and not summary["case"].str.startswith("VM").any()
    assert (summary[summary["case"] == "container"]["median"] > 0).all()
    env = json.load(open(tmp_path / "bench-environment.json"))
    assert "/boot" in env["vm_missing"] and any("no VM was measured" in n for n in env["notes"])
    text = json.dumps(json.load(open(tmp_path / name)))
    assert "no VM on this target" in text and "VM (not measured)" in text
    assert lab.processes() == [] and lab.call("vm.list") == []


def test_notebooks_are_picked_by_file_name_stem_or_number():
    from labkit.course.runbook import pick_notebooks
    from labkit.wire.errors import InvalidSpec
    assert pick_notebooks(["06-mini-docker", "00", "01-chroot.ipynb"]) == \
        ["06-mini-docker.ipynb", "00-setup.ipynb", "01-chroot.ipynb"]
    with pytest.raises(InvalidSpec) as err:
        pick_notebooks(["../../etc/passwd"])
    assert "06-mini-docker" in err.value.fix
