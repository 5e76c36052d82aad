"""The grader's part before a submission runs: read it without trusting it, put the check cells back."""
import json
import os

import pytest

from labkit.course.assign import grading_bundle, student_edition
from labkit.course.grade import BadSubmission, read_submission, restore
from labkit.course.grading import MIME
from labkit.course.runbook import NOTEBOOK_DIR

NAME = "03-cgroups"


@pytest.fixture(scope="module")
def source():
    with open(os.path.join(NOTEBOOK_DIR, NAME + ".ipynb"), encoding="utf-8") as f:
        src = json.load(f)
    return src, grading_bundle(NOTEBOOK_DIR)["notebooks"][NAME]


def _check_cells(nb, nbundle):
    return [c for c in nb["cells"] if c["id"] in nbundle["checks"]]


def _as_written(nb, src, nbundle):
    """Every check cell once, with the source's text, tags and metadata, in the source's order."""
    want = [c for c in src["cells"] if c["id"] in nbundle["checks"]]
    got = _check_cells(nb, nbundle)
    return [(c["id"], c["source"], c["metadata"]) for c in got] == \
        [(c["id"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"], c["metadata"]) for c in want]


def test_an_untouched_student_edition_comes_back_unchanged_but_for_its_outputs(source):
    src, nbundle = source
    sub = student_edition(src)
    out, notes = restore(sub, src, nbundle)
    assert notes == [] and _as_written(out, src, nbundle)
    assert [c["id"] for c in out["cells"]] == nbundle["cells"]


def test_every_output_goes_and_so_does_a_forged_score(source):
    """A student cell that displays a full score, and a markdown cell carrying `outputs` (papermill keeps
    them): none of it is left in the notebook the grader runs."""
    src, nbundle = source
    sub = student_edition(src)
    forged = {"output_type": "display_data", "metadata": {},
              "data": {MIME: {"question": "03.1 memory limit", "points": 2, "max_points": 2, "passed": True}}}
    for c in sub["cells"]:
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [forged], 7
        else:
            c["outputs"] = [forged]
    out, _ = restore(sub, src, nbundle)
    assert MIME not in json.dumps(out)
    assert all(c.get("outputs", []) == [] for c in out["cells"])
    assert all("outputs" not in c for c in out["cells"] if c["cell_type"] != "code")


def test_check_cells_edited_moved_retagged_or_deleted_come_back_as_written(source):
    src, nbundle = source
    sub = student_edition(src)
    cells = sub["cells"]
    by_id = {c["id"]: c for c in cells}
    by_id["03-06"]["source"] = 'print("full marks")'                      # edited
    by_id["03-09"]["metadata"]["tags"] = []                                # retagged
    moved = cells.pop(cells.index(by_id["03-12"]))                         # moved to the top
    cells.insert(0, moved)
    cells.remove(by_id["03-15"])                                           # deleted
    copy = dict(by_id["03-09"], id="mine-1", metadata={"tags": ["check"]})  # copied and tagged as a check
    cells.append(copy)
    out, notes = restore(sub, src, nbundle)
    got = {c["id"]: c for c in out["cells"]}
    for cid, entry in nbundle["checks"].items():
        assert got[cid]["source"] == entry["source"] and got[cid]["metadata"]["tags"] == ["check"], cid
    ids = [c["id"] for c in out["cells"]]
    assert len(ids) == len(set(ids)), "every cell has an id of its own"
    assert ids.index("03-15") == ids.index("03-14") + 1, "a deleted check cell comes back after its predecessor"
    assert ids[0] == "03-12", "a moved check cell stays where the student put it, restored"
    assert got["mine-1"]["metadata"]["tags"] == [], "a copy is the student's code, not a check cell"
    assert sorted(n.split()[2] for n in notes if n.startswith("check cell")) == ["03-06", "03-09", "03-15"]


def test_a_copied_cell_with_a_check_cells_id_is_not_that_check_cell(source):
    src, nbundle = source
    sub = student_edition(src)
    fake = {"cell_type": "code", "id": "03-06", "metadata": {"tags": ["check"]}, "outputs": [],
            "execution_count": None, "source": "check.results.append('forged')"}
    sub["cells"].insert(sub["cells"].index(next(c for c in sub["cells"] if c["id"] == "03-06")) + 1, fake)
    out, _ = restore(sub, src, nbundle)
    same = [c for c in out["cells"] if c["id"] == "03-06"]
    assert len(same) == 1 and same[0]["source"] == nbundle["checks"]["03-06"]["source"]
    forged = [c for c in out["cells"] if "forged" in c["source"]]
    assert len(forged) == 1 and forged[0]["id"] != "03-06" and "check" not in forged[0]["metadata"]["tags"]


@pytest.mark.parametrize("content,words", [
    (b"\x89PNG\r\n", "not a notebook"),
    (b'{"cells": "nope", "nbformat": 4}', "not an nbformat 4"),
    (b'{"cells": [], "nbformat": 3}', "not an nbformat 4"),
    (b'{"cells": [{"cell_type": "evil"}], "nbformat": 4}', "not a notebook cell"),
    (b"[" * 100000, "not a notebook"),
    (b'{"cells": []', "not a notebook"),
])
def test_a_file_that_is_not_a_notebook_is_a_bad_submission_with_its_reason(tmp_path, content, words):
    path = tmp_path / "sub.ipynb"
    path.write_bytes(content)
    with pytest.raises(BadSubmission, match=words):
        read_submission(str(path))


def test_a_huge_file_is_refused_before_it_is_read_whole(tmp_path):
    path = tmp_path / "big.ipynb"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    with pytest.raises(BadSubmission, match="larger than"):
        read_submission(str(path), max_bytes=1 << 20)


# -- the grader's own run of a check, against what a submission left on a real target -----------------

@pytest.fixture
def student(tmp_path, lab):
    """A 'student' connected through the grader's relay, and the grader's own Lab beside it."""
    import labkit
    from labkit.course.relay import Relay
    d = tmp_path / "sandbox"
    d.mkdir(mode=0o700)
    with Relay(lab.transport, str(d / "relay.sock")) as relay:
        with labkit.connect("unix://" + relay.path) as s:
            yield s, relay


@pytest.mark.privileged
def test_the_grader_re_runs_a_check_on_what_the_submission_left(student, lab):
    from labkit.course import checks
    from labkit.course.grade import evaluate
    from labkit.course.grading import ref_of
    s, relay = student
    with s.cgroup("t-grade-mem", memory="32M") as mem:
        hog = mem.run(["sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived"], ["pid", "mnt"])
        refs = {"args": [ref_of(mem)]}
        assert evaluate(checks.memory_limit, refs, lab, relay)[0] == 1.0
        assert evaluate(checks.oom_killed, {"args": [ref_of(mem), ref_of(hog)]}, lab, relay)[0] == 1.0
        forged = dict(hog, exit_code=137, steps=hog["steps"] + [{"kind": "command", "argv": ["true"]}])
        got, why = evaluate(checks.oom_killed, {"args": [ref_of(mem), ref_of(forged)]}, lab, relay)
        assert got == 0.0 and "forged or missing record" in why
    got, why = evaluate(checks.memory_limit, refs, lab, relay)
    assert got == 0.0 and "not on the target" in why, "the group is gone: nothing to grade"


@pytest.mark.privileged
def test_what_the_grader_cannot_rebuild_scores_zero_with_the_reason(student, lab):
    from labkit.course import checks
    from labkit.course.grade import Unverifiable, evaluate, rebuild
    s, relay = student
    assert evaluate(checks.memory_limit, {"args": [{"kind": "none"}]}, lab, relay) == (0.0, "not answered")
    got, why = evaluate(checks.memory_limit, {"args": [{"kind": "cgroup", "name": "../../etc"}]}, lab, relay)
    assert got == 0.0 and "could not rebuild" in why
    got, why = evaluate(checks.memory_limit, {"args": "nonsense"}, lab, relay)
    assert got == 0.0
    assert isinstance(rebuild({"kind": "object", "type": "DataFrame"}, lab, relay), Unverifiable)
    got, why = evaluate(checks.memory_limit, {"args": [{"kind": "object", "type": "DataFrame"}]}, lab, relay)
    assert got == 0.0 and why
