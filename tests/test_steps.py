"""Step widgets for real: each Next runs on this machine, Back and Reset undo by name, and neither a re-run
cell, a closed widget nor a kernel that exits half-way leaves anything behind."""
import json
import os
import subprocess
import sys

import pytest

from labkit.course.steps import Sequence, Step, docker_run
from labkit.wire.errors import LabkitError, NotFound

from conftest import REPO

pytestmark = pytest.mark.privileged


def status(lab, name):
    try:
        return lab.container(name).status
    except NotFound:
        return None


def ours(lab, name="t"):
    """What of sequence ``name`` is on the target (containers and networks by their exact names)."""
    ctrs = [c["name"] for c in lab.containers(all=True) if c["name"] == f"lk-step-{name}"]
    nets = [n["spec"]["name"] for n in lab.networks() if n["spec"]["name"] == f"st{name}"[:8]]
    return ctrs + nets


def test_next_runs_each_step_and_back_and_reset_undo_them(lab):
    seq = docker_run(lab, "t")
    try:
        records = [seq.next() for _ in range(4)]
        assert all(r is not None and r.steps for r in records[1:]), "each step shows what ran"
        assert seq.next() is None and seq.done == 4, "past the end nothing more happens"
        assert status(lab, "lk-step-t") == "running"
        assert "lk-step-t" in seq.state_html() and "lkbr-stt" in seq.state_html(), "the live state shows both"
        seq.back()
        assert status(lab, "lk-step-t") not in ("running", None), "Back from start stops its process"
        seq.back()
        assert status(lab, "lk-step-t") is None, "Back from create removes the container"
        seq.next()
        seq.next()
        assert status(lab, "lk-step-t") == "running", "and forward again works"
        seq.reset()
        assert ours(lab) == [] and seq.done == 0
    finally:
        seq.close()


def test_a_rerun_cell_or_a_killed_kernel_leaves_nothing_half_made(lab):
    """A kernel killed mid-sequence cannot undo anything; the same sequence made again clears it first."""
    code = ("import os, labkit; from labkit.course.steps import docker_run; s = docker_run(labkit.connect('local'), 't'); "
            "s.next(); s.next(); s.next(); os._exit(0)")  # os._exit: no atexit, as a SIGKILL
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)
    assert sorted(ours(lab)) == ["lk-step-t", "stt"], "the killed kernel left its container and network"
    seq = docker_run(lab, "t")
    try:
        assert sorted(seq.cleared) == ["container lk-step-t", "network stt"] and ours(lab) == []
    finally:
        seq.close()


def test_a_kernel_that_exits_or_restarts_undoes_its_sequences(lab):
    code = ("import labkit, sys; from labkit.course.steps import docker_run; s = docker_run(labkit.connect('local'), 't'); "
            "s.play(); print(s.lab.container('lk-step-t').status); sys.exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.strip() == "running", out.stderr
    assert ours(lab) == [], "the exiting kernel undid it"


def test_the_widget_clicks_through_and_closing_it_undoes_everything(lab):
    seq = docker_run(lab, "t")
    box = seq.widget()
    view = seq._view
    assert view["back"].disabled and not view["next"].disabled
    for _ in range(4):
        view["next"].click()
    assert view["next"].disabled and "step 4 of 4" in view["title"].value
    assert status(lab, "lk-step-t") == "running" and "running" in view["state"].value
    assert view["record"].outputs, "the last step's record is shown"
    view["back"].click()
    assert "step 3 of 4" in view["title"].value and status(lab, "lk-step-t") != "running"
    box.close()
    assert ours(lab) == [], "closing the widget undid the sequence"


def test_a_failing_step_leaves_nothing_of_itself_and_says_why_in_the_widget(lab):
    def bad(seq):
        seq.lab.create("busybox", ["true"], name="lk-step-u")
        raise LabkitError("the second half failed", fix="none")
    seq = Sequence(lab, "u", [Step("half a step", "makes a container, then fails", bad,
                                   makes=[("container", "lk-step-u")])])
    try:
        with pytest.raises(LabkitError):
            seq.next()
        assert status(lab, "lk-step-u") is None and seq.done == 0
        seq.widget()
        seq._view["next"].click()
        assert "the second half failed" in seq._view["error"].value
        assert status(lab, "lk-step-u") is None
    finally:
        seq.close()


def test_headless_papermill_saves_the_final_view_in_the_widget_state(tmp_path, lab):
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import labkit\nfrom labkit.course.steps import docker_run\n"
                                          "lab = labkit.connect('local')\nseq = docker_run(lab, 't').show()"),
                nbformat.v4.new_code_cell("print(lab.container('lk-step-t').status)\nseq.close()")]
    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, str(src))
    env = dict(os.environ, LABKIT_HEADLESS="1")
    subprocess.run([sys.executable, "-m", "papermill", "-k", "python3", str(src), str(out), "--cwd", REPO], check=True, env=env,
                   capture_output=True, timeout=300)
    done = json.loads(out.read_text())
    assert "running" in "".join(done["cells"][1]["outputs"][0]["text"]), "headless, it played to the end"
    state = done["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    values = " ".join(str(m["state"].get("value", "")) for m in state.values())
    assert "step 4 of 4" in values and "lk-step-t" in values, "the saved widget state shows the final view"
    assert ours(lab) == []


def test_a_container_built_one_mechanism_at_a_time_and_taken_apart_again(lab):
    from labkit.course.steps import build_a_container
    seq = build_a_container(lab, "tm")
    try:
        seq.play()
        proc = lab.find("process", "lk-step-tm")
        seen = proc.exec(["sh", "-c", "hostname; ls /sys/class/net"])
        assert seen.stdout.split() == ["tm", "eth0", "lo"], seen.stdout
        assert proc.pid in lab.find("cgroup", "lk-step-tm").stats()["procs"], "the process is in the step's cgroup"
        assert seq.state_html().count(">yes<") == 5, "the live state shows every mechanism in place"
        for _ in range(6):
            seq.back()
        for kind, name in (("rootfs", "lk-step-tm"), ("cgroup", "lk-step-tm"), ("overlay", "lk-step-tm"),
                           ("process", "lk-step-tm"), ("network", "sttm")):
            with pytest.raises(NotFound):
                lab.find(kind, name)
        assert seq.state_html().count(">yes<") == 0
    finally:
        seq.close()


def test_the_web_server_walkthrough_serves_edits_and_undoes_its_page_image_and_container(lab):
    from labkit.course.steps import web_server
    seq = web_server(lab, "tw", port=8093)
    try:
        networks = {n["spec"]["name"] for n in lab.networks()}
        records = seq.play()
        assert "sttw" in {n["spec"]["name"] for n in lab.networks()} - networks, "on a network of its own"
        assert "Welcome to the course web server" in records[3].stdout, "fetched through the published port"
        assert "changed from inside" in records[5].stdout, "exec changed the page in the container's layer"
        seq.back()
        seq.back()  # undoes the edit: the page is the built one again
        from labkit.course.checks import HTTP_GET
        page = lab.run(["python3", "-c", HTTP_GET, "http://127.0.0.1:8093/"]).stdout
        assert "Welcome to the course web server" in page and seq.done == 4, page
        seq.reset()
        assert status(lab, "lk-step-tw") is None
        with pytest.raises(NotFound):
            lab.image("lk-step-tw:v1")
        assert {n["spec"]["name"] for n in lab.networks()} == networks, "its network went, no other came or went"
    finally:
        seq.close()
