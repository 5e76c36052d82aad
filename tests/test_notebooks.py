"""Every notebook runs under papermill, in each edition (English, and every translation: notebooks/ko): with
the solutions (full points, read back from the output notebook) and as the student edition left blank (runs
to the end; every check records zero with a reason)."""
import json
import os

import pytest

from labkit.course.assign import student_edition
from labkit.course.runbook import NOTEBOOK_DIR, NotebookRun, course_notebooks, run_notebooks
from labkit.course.grading import read_refs, read_scores

pytestmark = [pytest.mark.privileged, pytest.mark.slow]
NOTEBOOKS = course_notebooks()
EDITIONS = NOTEBOOKS + [f"{lang}/{n}" for lang in ("ko",) if os.path.isdir(os.path.join(NOTEBOOK_DIR, lang))
                        for n in course_notebooks(os.path.join(NOTEBOOK_DIR, lang))]


#: the folder where this very CI run's lab command left the notebooks it executed (.ci/run sets it: the same
#: commit, on the same machine, minutes before): the solution editions are read back from there, each checked to
#: be the notebook as it is now, instead of being executed a second time. Unset: every one is executed here.
LAB_OUTPUT = os.environ.get("LABKIT_LAB_OUTPUT")


def _solution_run(source_dir, name, tmp_path):
    """(the run, the folder its charts went to): the lab command's, where it left one of this very notebook, or
    a run made now."""
    if LAB_OUTPUT:
        sub = os.path.relpath(source_dir, NOTEBOOK_DIR)
        path = os.path.join(LAB_OUTPUT, "" if sub == "." else sub, name)
        if os.path.exists(path):
            ran, src = json.load(open(path)), json.load(open(os.path.join(source_dir, name)))
            executed = {c.get("id"): c["source"] for c in ran["cells"] if c["cell_type"] == "code"}
            for c in src["cells"]:
                if c["cell_type"] == "code":
                    code = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                    got = executed.get(c["id"])
                    got = "".join(got) if isinstance(got, list) else got
                    assert got == code, f"{path} is not this {name} (cell {c['id']} differs): run the lab command again"
            return NotebookRun(name, path, read_scores(path), 0.0, None), os.path.dirname(path)
    [run] = run_notebooks("local", str(tmp_path), [name], student_id="tester", source_dir=source_dir)
    return run, str(tmp_path)


def _where(name):
    """(the folder, the file name) of an edition's notebook, e.g. 'ko/01-chroot.ipynb'."""
    sub, base = os.path.split(name)
    return os.path.join(NOTEBOOK_DIR, sub), base


def test_there_are_notebooks_with_parameters_cells():
    assert NOTEBOOKS[:3] == ["00-setup.ipynb", "01-chroot.ipynb", "02-namespaces.ipynb"]
    for name in NOTEBOOKS:
        nb = json.load(open(os.path.join(NOTEBOOK_DIR, name)))
        tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
        assert ["parameters"] in tags, f"{name} has no tagged parameters cell"


@pytest.mark.parametrize("name", EDITIONS)
def test_solution_scores_full_points(name, tmp_path, lab):
    source_dir, name = _where(name)
    run, out_dir = _solution_run(source_dir, name, tmp_path)
    assert run.error is None, run.error
    scores = run.scores
    questions = [s for s in scores if s["question"] != "total"]
    assert questions, "the notebook recorded no scores"
    for s in questions:
        assert s["passed"] and s["points"] == s["max_points"], s
    refs = read_refs(run.path)  # what each check was given, as the grader will use it
    assert sorted(refs) == sorted(s["question"] for s in questions)
    assert not [r for r in refs.values() if "error" in r or any(a["kind"] == "none" for a in r["args"])]
    if name == "03-cgroups.ipynb":
        assert refs["03.1 memory limit"]["args"] == [{"kind": "cgroup", "name": "student-mem"}]
        assert refs["03.2 OOM kill"]["args"][1]["kind"] == "record"
    total = scores[-1]
    assert total["question"] == "total" and total["points"] == sum(s["max_points"] for s in questions) > 0
    if os.path.basename(source_dir) == "ko":
        _feedback_in_korean(run.path, questions)
    if name.startswith("02"):
        assert os.path.getsize(os.path.join(out_dir, "02-isolation-matrix.png")) > 10_000
    assert lab.processes() == [], "the notebook left processes running"


def _feedback_in_korean(path, questions):
    """The Korean edition shows its badges, score table and the checks' feedback in Korean (the score under the
    grader's MIME type keeps the check's English)."""
    import html
    from labkit.course.feedback import translate
    from labkit.course.grading import MIME
    shown = ["".join(o["data"]["text/html"]) for c in json.load(open(path))["cells"] for o in c.get("outputs", [])
             if MIME in (o.get("data") or {})]  # (nbformat keeps a text as a list of its lines)
    assert shown and all("통과" in h and "PASS" not in h for h in shown), shown[:2]
    assert "합계" in shown[-1]
    korean = [s for s in questions if translate(s["feedback"], "ko") != s["feedback"]]
    assert len(korean) >= 0.8 * len(questions), [s["feedback"] for s in questions if s not in korean]
    for s, h in zip(questions, shown):
        assert html.escape(translate(s["feedback"], "ko")) in h, (s["feedback"], h)


@pytest.mark.parametrize("name", EDITIONS)
def test_blank_edition_runs_to_the_end_with_zero(name, tmp_path, lab):
    source_dir, name = _where(name)
    src = json.load(open(os.path.join(source_dir, name)))
    blank = student_edition(src)
    assert "BEGIN SOLUTION" not in json.dumps(blank)
    srcdir = tmp_path / "src"
    srcdir.mkdir()
    (srcdir / name).write_text(json.dumps(blank))
    [run] = run_notebooks("local", str(tmp_path / "out"), [name], source_dir=str(srcdir))
    assert run.error is None, run.error
    out, scores = run.path, run.scores
    questions = [s for s in scores if s["question"] != "total"]
    assert questions and all(s["points"] == 0 for s in questions)
    assert all("not answered" in s["feedback"] for s in questions)
    assert scores[-1]["question"] == "total" and scores[-1]["points"] == 0
    assert read_scores(out) == scores
