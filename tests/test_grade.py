"""The grader's part before a submission runs: read it without trusting it, put the check cells back."""
import json
import os
import re

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
    source_tags = {c["id"]: c["metadata"].get("tags") for c in src["cells"]}
    for cid, entry in nbundle["checks"].items():  # (the source's tags: "check", and the lecture topics it checks)
        tags = got[cid]["metadata"]["tags"]
        assert got[cid]["source"] == entry["source"] and "check" in tags and tags == source_tags[cid], cid
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
        typed = {"kind": "value", "value": {"exit_code": 137}}  # a plain dict in place of the record
        got, why = evaluate(checks.oom_killed, {"args": [ref_of(mem), typed]}, lab, relay)
        assert got == 0.0 and "expected the record" in why
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


# -- whole submissions: the solution scores full, the four forgeries score nothing ------------------------

@pytest.fixture
def box(lab):
    """One submission's sandbox: a fresh agent in namespaces of its own, and the kernel's user and cgroup."""
    from labkit.course.sandbox import Sandbox
    with Sandbox(lab, sandbox="container") as b:
        yield b


def _submission(tmp_path, name, edit=None, solution=False):
    """A student's file: the solution edition, or the student edition (blank) changed by ``edit``."""
    with open(os.path.join(NOTEBOOK_DIR, name + ".ipynb"), encoding="utf-8") as f:
        nb = json.load(f)
    if not solution:
        nb = student_edition(nb)
    if edit:
        edit(nb)
    path = tmp_path / "submissions" / f"s1-{name}.ipynb"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(nb))
    return str(path)


def _before_checks(nb, cell):
    first = next(i for i, c in enumerate(nb["cells"]) if "check" in c.get("metadata", {}).get("tags", []))
    nb["cells"].insert(first, cell)


def _code(source, cid):
    return {"cell_type": "code", "id": cid, "metadata": {}, "outputs": [], "execution_count": None, "source": source}


FULL = ('{"notebook": "00-setup", "question": "%s", "points": 1, "max_points": 1, "passed": True, '
        '"feedback": "forged", "student": "s1"}')


def _forge_display(nb):        # 1: a student cell displays full scores under the score MIME type
    src = "from IPython.display import display\n" + "\n".join(
        f"display({{'{MIME}': {FULL % q}}}, raw=True)" for q in ("00.1 kernel release", "00.2 cgroup mode"))
    _before_checks(nb, _code(src, "f1"))


def _forge_checks(nb):         # 2: a student cell replaces the checks before the check cells run
    _before_checks(nb, _code("from labkit.course import checks as _c\n"
                                "_c.kernel_release = _c.cgroup_mode = lambda lab, answer: (True, 'forged')\n"
                                "kernel_release = cgroup_mode = 'anything'", "f2"))


def _forge_display_fn(nb):     # 3: a student cell patches the grading module's display
    _before_checks(nb, _code("import labkit.course.grading as _g\n_real = _g._display\n"
                                "_g._display = lambda s, r=None, **kw: _real(dict(s, points=s['max_points'], passed=True), r, **kw)",
                                "f3"))


def _forge_markdown(nb):       # 4: a markdown cell carrying outputs with full scores
    nb["cells"].insert(1, {"cell_type": "markdown", "id": "f4", "metadata": {}, "source": "hi",
                           "outputs": [{"output_type": "display_data", "metadata": {},
                                        "data": {MIME: json.loads(FULL.replace("True", "true") % "00.1 kernel release")}}]})


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.parametrize("case,edit,solution,want", [
    ("solution", None, True, 2),
    ("forged display", _forge_display, False, 0),
    ("forged checks", _forge_checks, False, 0),
    ("forged _display", _forge_display_fn, False, 0),
    ("forged markdown outputs", _forge_markdown, False, 0),
])
def test_only_the_grader_writes_the_scores(tmp_path, box, case, edit, solution, want):
    from labkit.course.grade import grade_notebook
    bundle = grading_bundle(NOTEBOOK_DIR)
    path = _submission(tmp_path, "00-setup", edit, solution)
    res = grade_notebook(path, bundle, box, NOTEBOOK_DIR, student_id="s1", work_dir=str(tmp_path / "work"))
    assert res["notebook"] == "00-setup" and res["error"] is None, res
    got = sum(q["points"] for q in res["questions"])
    assert got == want, (case, res["questions"])
    assert [q["question"] for q in res["questions"]] == ["00.1 kernel release", "00.2 cgroup mode"]
    if want == 0:
        assert all(q["feedback"] for q in res["questions"]), "each zero says why"
    if case in ("forged display", "forged checks", "forged _display"):
        from labkit.course.grading import read_scores
        in_kernel = [x for x in read_scores(res["executed"]) if x.get("question") == "00.1 kernel release"]
        assert any(x["points"] == x["max_points"] for x in in_kernel), "the forgery did work in the student's kernel"


def _assigned_class(tmp_path):
    """`labkit assign` run as an instructor runs it: (the bundle's path, an empty submissions folder); the
    student editions are in tmp_path / "class"."""
    import subprocess
    import sys
    bundle = tmp_path / "bundle.json"
    res = subprocess.run([sys.executable, "-m", "labkit.cli", "assign", "--output", str(tmp_path / "class"),
                          "--bundle", str(bundle)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    subs = tmp_path / "subs"
    subs.mkdir()
    return bundle, subs


@pytest.mark.privileged
@pytest.mark.slow
def test_labkit_grade_writes_a_gradebook_feedback_and_skips_what_did_not_change(tmp_path):
    """A small class through the command: a full solution, a blank edition, a file that is no notebook."""
    import csv
    import subprocess
    import sys
    bundle, subs = _assigned_class(tmp_path)
    with open(os.path.join(NOTEBOOK_DIR, "00-setup.ipynb"), encoding="utf-8") as f:
        (subs / "alice-00-setup.ipynb").write_text(f.read())
    (subs / "bob-00-setup.ipynb").write_text((tmp_path / "class" / "00-setup.ipynb").read_text())
    (subs / "carol-00-setup.ipynb").write_bytes(b"\x00\x01 not a notebook")

    def grade(*extra):
        return subprocess.run([sys.executable, "-m", "labkit.cli", "grade", "--bundle",
                               str(bundle), "--out", str(tmp_path / "grades"), *extra,
                               *sorted(str(p) for p in subs.iterdir())], capture_output=True, text=True, timeout=600)
    first = grade()
    assert first.returncode == 0, first.stdout + first.stderr
    with open(tmp_path / "grades" / "gradebook.csv") as f:
        book = {r["student"]: r for r in csv.DictReader(f)}
    assert float(book["alice"]["total"]) == 2 and float(book["bob"]["total"]) == 0
    assert float(book["carol"]["total"]) == 0 and "not a notebook" in first.stdout
    assert re.search(r"carol +00-setup +0/2 ", first.stdout), "zero of that notebook's points"
    assert "00.1 kernel release" in book["alice"] and (tmp_path / "grades" / "totals.png").exists()
    page = (tmp_path / "grades" / "feedback" / "bob.html").read_text()
    assert "00.1 kernel release" in page and "not answered" in page
    again = grade()
    assert again.stdout.count("unchanged: not run again") == 3, again.stdout
    forced = grade("--force")
    assert "unchanged" not in forced.stdout and forced.returncode == 0


def _endless(nb):
    _before_checks(nb, _code("while True:\n    pass", "loop"))


def _kill_kernel_between(nb):
    at = [i for i, c in enumerate(nb["cells"]) if "check" in c.get("metadata", {}).get("tags", [])][1]
    nb["cells"].insert(at, _code("import os\nos._exit(1)", "bye"))


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.parametrize("case,edit,want,note", [
    ("endless loop", _endless, [1, 1], "ran past the time limit"),
    ("killed kernel", _kill_kernel_between, [1, 0], "killed the kernel"),
])
def test_a_cell_that_hangs_or_kills_its_kernel_costs_only_what_it_reached(tmp_path, box, case, edit, want, note):
    from labkit.course.grade import grade_notebook
    path = _submission(tmp_path, "00-setup", edit, solution=True)
    res = grade_notebook(path, grading_bundle(NOTEBOOK_DIR), box, NOTEBOOK_DIR, student_id="s1",
                         work_dir=str(tmp_path / "work"), cell_timeout=30)  # lab.doctor() took over 5 s on a busy CI
    assert [q["points"] for q in res["questions"]] == want, res
    assert any(note in n for n in res["notes"]) and res["error"] is None, res


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.parametrize("name", ["01-chroot", "03-cgroups", "04-overlay-and-images", "05-networking",
                                  "06-mini-docker", "08-security", "09-orchestration"])
def test_a_full_solution_scores_full_points_when_the_grader_checks_it(tmp_path, box, name):
    """The grader's own checks, given what a real run left on the target, agree with the solution."""
    from labkit.course.grade import grade_notebook
    path = _submission(tmp_path, name, solution=True)
    res = grade_notebook(path, grading_bundle(NOTEBOOK_DIR), box, NOTEBOOK_DIR, student_id="s1",
                         work_dir=str(tmp_path / "work"))
    short = [q for q in res["questions"] if q["points"] < q["max_points"]]
    assert res["error"] is None and not short, short


@pytest.mark.privileged
@pytest.mark.slow
def test_lab_09_is_graded_on_a_target_of_its_own(tmp_path, lab):
    """Lab 09's cluster (three nodes, the manager's loop, the routing mesh) run by the sandboxed kernel on a
    disposable target (`labkit grade --sandbox target`): the grader's own checks, with the records of
    cluster.create, stack.deploy and service.update taken from the relay's journal, agree with the solution;
    the notebook removes its cluster at its end."""
    from labkit.course.grade import grade_notebook
    from labkit.course.sandbox import Sandbox
    path = _submission(tmp_path, "09-orchestration", solution=True)
    with Sandbox(lab, sandbox="target", target=lab) as box:
        res = grade_notebook(path, grading_bundle(NOTEBOOK_DIR), box, NOTEBOOK_DIR, student_id="s1",
                             work_dir=str(tmp_path / "work"))
    short = [q for q in res["questions"] if q["points"] < q["max_points"]]
    assert res["error"] is None and not short and len(res["questions"]) == 8, short
    assert lab.call("cluster.list") == [] and lab.processes() == []


@pytest.mark.privileged
@pytest.mark.slow
def test_lab_09_scores_full_in_the_grading_vm(tmp_path, lab):
    """Lab 09's whole cluster (three nodes, health-checked tasks, the mesh, a stack, a rolled-back update) inside
    the default sandbox's guest, under TCG here: a health check starts a process in its task, over a second
    when emulated, and the checks give the manager's loop its time (this had scored 16 of 20 here, with
    health checks that had to end within 2 s)."""
    from labkit.course.grade import grade_notebook
    from labkit.course.sandbox import Sandbox
    path = _submission(tmp_path, "09-orchestration", solution=True)
    with Sandbox(lab, sandbox="vm") as box:
        res = grade_notebook(path, grading_bundle(NOTEBOOK_DIR), box, NOTEBOOK_DIR, student_id="s1",
                             work_dir=str(tmp_path / "work"))
    short = [(q["question"], q["points"], q["feedback"]) for q in res["questions"] if q["points"] < q["max_points"]]
    assert res["error"] is None and not short and len(res["questions"]) == 8, short


@pytest.mark.privileged
@pytest.mark.slow
def test_a_result_computed_in_the_kernel_is_judged_by_what_the_agent_did(tmp_path, box):
    """08.6's isolation matrix is computed in the student's kernel: the grader cannot take it, but the
    relay's journal says whether a VM was really started for it (here it was not: vm=False)."""
    from labkit.course.grade import grade_notebook

    def no_vm(nb):
        for c in nb["cells"]:
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            c["source"] = src.replace("columns=isolation.ALL, vm=True)", "columns=isolation.ALL, vm=False)")
    path = _submission(tmp_path, "08-security", no_vm, solution=True)
    res = grade_notebook(path, grading_bundle(NOTEBOOK_DIR), box, NOTEBOOK_DIR, student_id="s1",
                         work_dir=str(tmp_path / "work"))
    [q] = [q for q in res["questions"] if q["question"] == "08.6 one kernel"]
    assert q["points"] == 0.6 and "vm=True" in q["feedback"], q


def _made_up_numbers(nb):  # the figures typed in (or read off a forged BenchResult), not measured
    at = next(i for i, c in enumerate(nb["cells"]) if c.get("id") == "61326aa9")
    nb["cells"].insert(at, _code("answers = {'cpu_ratio': 0.25, 'vm_start_over_labkit': 1000.0, "
                                 "'vm_over_container_memory': 0.001}", "madeup"))


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.parametrize("case,edit,want73", [("solution", None, 3), ("made-up numbers", _made_up_numbers, 0)])
def test_the_harness_is_judged_from_the_journal(tmp_path, box, case, edit, want73):
    """07.2's and 07.3's BenchResult is computed in the student's kernel; the grader reads from its journal
    which experiments and cases the agent really measured, and the figures the answers must match."""
    from labkit.course.grade import grade_notebook
    path = _submission(tmp_path, "07-containers-vs-vms", edit, solution=True)
    res = grade_notebook(path, grading_bundle(NOTEBOOK_DIR), box, NOTEBOOK_DIR, student_id="s1",
                         work_dir=str(tmp_path / "work"))
    got = {q["question"]: q for q in res["questions"]}
    for q in ("07.1 whose kernel", "07.2 the harness"):
        assert got[q]["points"] == got[q]["max_points"], got[q]
    assert got["07.3 read the numbers"]["points"] == want73, got["07.3 read the numbers"]
    if want73 == 0:
        assert "is not" in got["07.3 read the numbers"]["feedback"]


# -- a whole hostile class, graded two at a time -------------------------------------------------------------

def _insert_before(nb, cid, cell):
    at = next(i for i, c in enumerate(nb["cells"]) if c.get("id") == cid)
    nb["cells"].insert(at, cell)


def _host_state():
    """What the grading host must still look like afterwards: its mounts and its files' tree under /srv."""
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(" ".join(line.split()[3:5]) for line in f)
    return mounts, sorted(os.listdir("/usr/bin"))[:50], os.path.exists("/usr/bin/python3")


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ["vm", "container"])
def test_a_hostile_class_scores_exactly_and_leaves_the_host_as_it_was(tmp_path, lab, sandbox):
    """Fifteen submissions of lab 00 from the student edition (solution, blank, partial, the four
    forgeries, an edited check cell, a fork bomb, a memory hog, an endless loop, `rm -rf /` as root on the
    agent, deleted check cells, a corrupted file, and one that tries to read the bundle and another
    student's file), graded with two jobs at once in each sandbox (a restored guest per submission, and the
    container agent): every score exact, with its reason."""
    import pwd
    import subprocess

    from labkit.course.grade import grade_class
    from labkit.course.sandbox import UID_BASE
    import pathlib
    import shutil
    import tempfile
    name = "00-setup"
    home = pathlib.Path(tempfile.mkdtemp(prefix="labkit-class-", dir="/srv" if os.path.isdir("/srv") else "/opt"))
    os.chmod(home, 0o755)  # an instructor's folder that every local user could read: only the sandbox hides it
    try:
        bundle = grading_bundle(NOTEBOOK_DIR)
        (home / "bundle.json").write_text(json.dumps(bundle))
        os.chmod(home / "bundle.json", 0o644)
        subs = home / "subs"
        subs.mkdir()
        with open(os.path.join(NOTEBOOK_DIR, name + ".ipynb"), encoding="utf-8") as f:
            solution = json.load(f)
        blank = student_edition(solution)

        def sub(student, base, *edits, raw=None):
            path = subs / f"{student}-{name}.ipynb"
            if raw is not None:
                path.write_bytes(raw)
            else:
                nb = json.loads(json.dumps(base))
                for e in edits:
                    e(nb)
                path.write_text(json.dumps(nb))
            os.chmod(path, 0o644)

        alice_marker = "ALICE-SECRET-" + "7" * 8
        sub("alice", solution, lambda nb: nb["cells"].append({"cell_type": "markdown", "id": "note", "metadata": {},
                                                                 "source": alice_marker}))
        sub("bob", blank)
        sub("carol", solution, lambda nb: _insert_before(nb, "00-10", _code("cgroup_mode = 'v7'", "oops")))
        sub("forger1", blank, _forge_display)
        sub("forger2", blank, _forge_checks)
        sub("forger3", blank, _forge_display_fn)
        sub("forger4", blank, _forge_markdown)

        def edit_check(nb):
            c = next(c for c in nb["cells"] if c.get("id") == "00-07")
            c["source"] = "check.check('00.1 kernel release', 1, lambda lab, a: (True, 'mine'), None)"
        sub("dave", blank, edit_check)
        sub("erin", solution, lambda nb: _before_checks(nb, _code(
            "import subprocess\nsubprocess.Popen(['sh', '-c', 'f() { f | f & }; f'])\nimport time; time.sleep(3)", "bomb")))
        sub("frank", solution, lambda nb: nb["cells"].append(_code("hog = bytearray(8 << 30)\nhog[::4096] = b'x' * len(hog[::4096])",
                                                                    "hog")))
        sub("grace", solution, lambda nb: _before_checks(nb, _code("while True:\n    pass", "loop")))
        sub("heidi", solution, lambda nb: nb["cells"].append(_code(
            "print(lab.run(['rm', '-rf', '--no-preserve-root', '/'], timeout=300).exit_code)", "rmrf")))
        def delete_and_reorder(nb):
            cells = [c for c in nb["cells"] if "check" not in c.get("metadata", {}).get("tags", [])]
            last_text = max(i for i, c in enumerate(cells) if c["cell_type"] == "markdown")
            nb["cells"] = [cells[last_text]] + cells[:last_text] + cells[last_text + 1:]
        sub("ivan", solution, delete_and_reorder)
        sub("judy", None, raw=b'{"cells": [ truncated')
        bundle_path, alice_path = str(home / "bundle.json"), str(subs / f"alice-{name}.ipynb")
        sub("mallory", solution, lambda nb: _before_checks(nb, _code(
            "import subprocess\nfor p in [%r, %r]:\n"
            "    try:\n        print('kernel read', open(p).read()[:300])\n    except OSError as e:\n        print('kernel', e)\n"
            "    print('agent read', lab.run(['cat', p]).stdout[:300])\n" % (bundle_path, alice_path), "peek")))
        want = {"alice": [1, 1], "bob": [0, 0], "carol": [1, 0], "forger1": [0, 0], "forger2": [0, 0], "forger3": [0, 0],
                "forger4": [0, 0], "dave": [0, 0], "erin": [1, 1], "frank": [1, 1], "grace": [1, 1], "heidi": [1, 1],
                "ivan": [1, 1], "judy": [0, 0], "mallory": [1, 1]}
        assert len(want) >= 12

        before = _host_state()
        out = home / "grades"
        done = []
        book = grade_class(sorted(str(p) for p in subs.iterdir()), bundle, lab, NOTEBOOK_DIR,
                           str(out), sandbox=sandbox, hide=[bundle_path], jobs=2, cell_timeout=30,
                           submission_timeout=300, on_done=done.append)
        by = {r["student"]: r for r in done}
        got = {s: [q["points"] for q in by[s]["questions"]] for s in want}
        assert got == want, {s: (got[s], by[s]["error"], by[s]["notes"], [q["feedback"][:100] for q in by[s]["questions"]])
                             for s in want if got[s] != want[s]}
        assert list(book["total"].reindex(sorted(want))) == [sum(want[s]) for s in sorted(want)]
        reasons = {s: " ".join([str(by[s]["error"])] + by[s]["notes"] + [q["feedback"] for q in by[s]["questions"]])
                   for s in want}
        assert "not answered" in reasons["bob"]
        assert "was changed" in reasons["dave"]
        assert "ran past the time limit" in reasons["grace"]
        assert "was missing: put back" in reasons["ivan"]
        assert "not a notebook" in reasons["judy"]
        assert all(q["feedback"] for s in want for q in by[s]["questions"]), "every score says why"
        executed = json.load(open(by["mallory"]["executed"]))
        peek = json.dumps([c.get("outputs") for c in executed["cells"] if c.get("id") == "peek"])
        assert "agent read" in peek and "kernel" in peek, ("the attempt did run", peek)
        assert alice_marker not in peek and bundle["source_sha256"] not in peek, \
            "neither the kernel nor the agent it drives can read the bundle or another student's file"
        assert _host_state() == before, "the host's mounts and files are as they were"
        ps = subprocess.run(["ps", "-ww", "-eo", "uid=,args="], capture_output=True, text=True).stdout.splitlines()
        assert not [p for p in ps if p.split()[0].isdigit() and int(p.split()[0]) >= UID_BASE], "no kernel is left"
        assert not [p for p in ps if "labkit.agent.sandbox" in p or "labkit-vm-" in p], "no sandbox is left"
        assert {r["sandbox_info"]["sandbox"] for r in done if r.get("sandbox_info")} == {sandbox}
        with pytest.raises(KeyError):
            pwd.getpwuid(UID_BASE)
        assert not any(g.startswith("grade-") for g in lab.call("cgroup.list")), "every sandbox cgroup is gone"
        leftovers = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "tools",
                                 "leftovers")
        if os.path.exists(leftovers):
            res = subprocess.run([leftovers], capture_output=True, text=True)
            assert res.stdout == "", res.stdout
    finally:
        shutil.rmtree(home)


@pytest.mark.privileged
@pytest.mark.slow
def test_labkit_grade_sends_submissions_to_a_dask_cluster_or_drives_a_given_target(tmp_path):
    """`--dask ADDRESS`: a real local Dask scheduler with two worker processes grades the class;
    `--sandbox target --target T`: the given (disposable) target is driven, one submission at a time."""
    import csv
    import subprocess
    import sys
    from dask.distributed import LocalCluster
    bundle, subs = _assigned_class(tmp_path)
    for who in ("ann", "ben"):
        with open(os.path.join(NOTEBOOK_DIR, "00-setup.ipynb"), encoding="utf-8") as f:
            (subs / f"{who}-00-setup.ipynb").write_text(f.read())
    (subs / "cat-00-setup.ipynb").write_text((tmp_path / "class" / "00-setup.ipynb").read_text())

    def grade(out, *extra):
        res = subprocess.run([sys.executable, "-m", "labkit.cli", "grade", "--bundle", str(bundle), "--out", str(out),
                              *extra, *sorted(str(p) for p in subs.iterdir())], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        with open(out / "gradebook.csv") as f:
            return {r["student"]: float(r["total"]) for r in csv.DictReader(f)}, res
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=0,
                      dashboard_address=None) as cluster:
        book, _ = grade(tmp_path / "dask", "--dask", cluster.scheduler_address)
    assert book == {"ann": 2, "ben": 2, "cat": 0}
    results = [json.loads(p.read_text()) for p in (tmp_path / "dask" / "results").rglob("*.json")]
    assert {r["sandbox"] for r in results} == {"vm"} and all(r["seconds"] > 0 for r in results), "vm is the default"
    assert {r["sandbox_info"]["accel"] for r in results} <= {"kvm", "tcg"}, "and says how its guests ran"
    book, _ = grade(tmp_path / "target", "--sandbox", "target", "--target", "local")
    assert book == {"ann": 2, "ben": 2, "cat": 0}
    refused = subprocess.run([sys.executable, "-m", "labkit.cli", "grade", "--bundle", str(bundle), "--out",
                              str(tmp_path / "x"), "--sandbox", "target", "--target", "local", "--jobs", "2",
                              str(subs)], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "one disposable target" in refused.stderr + refused.stdout


def test_the_questions_that_boot_a_vm_are_known_to_the_grader():
    """Under --sandbox vm these score zero with the grading VM's reason; `labkit grade` says so first."""
    from labkit.course.grade import vm_questions
    assert vm_questions(grading_bundle(NOTEBOOK_DIR)) == ["07.1 whose kernel", "07.2 the harness",
                                                          "07.3 read the numbers", "08.6 one kernel"]
