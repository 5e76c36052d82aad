"""Checks record points that survive papermill and never stop a notebook."""
import pytest

from labkit.course.assign import strip_source, student_edition
from labkit.course.grading import MIME, Checker, read_scores


def test_scores_for_right_partial_blank_and_broken_answers(capsys):
    c = Checker(lab=None, notebook="t", student_id="s1")
    c.check("q1", 2, lambda lab, a: (a == 42, "ok"), 42)
    c.check("q2", 2, lambda lab, a: (0.5, "half"), 1)
    c.check("q3", 2, lambda lab, a: (True, "never called"), None)
    c.check("q4", 2, lambda lab, a: 1 / 0, 1)
    c.check("q5", 2, lambda lab, a: (7, "clamped"), 1)
    pts = [r["points"] for r in c.results]
    assert pts == [2, 1, 0, 0, 2]
    assert "not answered" in c.results[2]["feedback"]
    assert "ZeroDivisionError" in c.results[3]["feedback"]
    assert c.total == (5, 10)


def test_read_scores_from_an_output_notebook():
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "display_data", "data": {MIME: {"question": "q1", "points": 1}, "text/plain": "x"}}]},
        {"cell_type": "markdown", "source": "hi"}]}
    assert read_scores(nb) == [{"question": "q1", "points": 1}]


def test_student_edition_drops_solutions_and_outputs():
    src = "x = None  # your turn\n### BEGIN SOLUTION\nx = 42\n### END SOLUTION\nx"
    assert strip_source(src) == "x = None  # your turn\nx"
    nb = {"cells": [{"cell_type": "code", "source": src, "outputs": [{"a": 1}], "execution_count": 3}],
          "metadata": {"jupytext": {"formats": "ipynb,md"}, "kernelspec": {"name": "python3"}}}
    out = student_edition(nb)
    assert out["cells"][0]["outputs"] == [] and "42" not in out["cells"][0]["source"]
    assert out["metadata"] == {"kernelspec": {"name": "python3"}}, "a student's copy is not paired with the source text"
    assert nb["cells"][0]["outputs"] == [{"a": 1}], "the source notebook is left alone"


def test_the_grading_bundle_names_every_check_cell_and_its_points():
    from labkit.course.assign import grading_bundle
    from labkit.course.runbook import NOTEBOOK_DIR
    bundle = grading_bundle(NOTEBOOK_DIR)
    assert sum(n["points"] for n in bundle["notebooks"].values()) == 93
    nb = bundle["notebooks"]["03-cgroups"]
    assert nb["checks"]["03-06"]["questions"] == [{"question": "03.1 memory limit", "points": 2,
                                                  "check": "memory_limit"}]
    assert all(cid in nb["cells"] for cid in nb["checks"])
    from labkit.course import checks
    named = {q["check"] for n in bundle["notebooks"].values() for c in n["checks"].values() for q in c["questions"]}
    assert named and all(callable(getattr(checks, name, None)) for name in named)
    assert len(bundle["source_sha256"]) == 64


def _nb(*cells):
    return {"cells": [dict({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None}, **c)
                      for c in cells], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


@pytest.mark.parametrize("cells,words", [
    ([{"id": "a", "source": 'check.check("q", 1, f, x)'}], "must be tagged"),
    ([{"id": "a", "source": 'check.check("q", 1, my_own_check, x)', "metadata": {"tags": ["check"]}}], "checks.NAME"),
    ([{"id": "a", "source": "x = 1", "metadata": {"tags": ["check"]}}], "must be tagged"),
    ([{"id": "a", "source": 'check.check("q", n, checks.f, x)', "metadata": {"tags": ["check"]}}], "literal"),
    ([{"id": "a", "source": 'check.check("q", 1, checks.f)', "metadata": {"tags": ["check"]}},
      {"id": "b", "source": 'check.check("q", 2, checks.f)', "metadata": {"tags": ["check"]}}], "asked twice"),
    ([{"id": "a", "source": "x"}, {"id": "a", "source": "y"}], "id of its own"),
    ([{"source": "x"}], "id of its own"),
])
def test_a_source_the_grader_could_not_restore_is_refused(cells, words):
    from labkit.course.assign import notebook_bundle
    from labkit.wire.errors import InvalidSpec
    with pytest.raises(InvalidSpec, match=words):
        notebook_bundle(_nb(*cells), "t.ipynb")


HIDDEN = '''"""Hidden checks for lab 03."""
from labkit.course.assign import hidden


@hidden(after="03.1 memory limit", question="03.1h no swap", points=1)
def no_swap(lab, cg):
    return cg.limits().get("swap") == 0, "the group may not swap"
'''


def test_hidden_checks_go_into_the_bundle_and_nowhere_else(tmp_path):
    import json
    import subprocess
    import sys
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / "03-cgroups.py").write_text(HIDDEN)
    res = subprocess.run([sys.executable, "-m", "labkit.cli", "assign", "--output", str(tmp_path / "class"),
                          "--bundle", str(tmp_path / "bundle.json"), "--hidden", str(tmp_path / "hidden")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    bundle = json.loads((tmp_path / "bundle.json").read_text())
    entry = bundle["notebooks"]["03-cgroups"]["hidden"]
    assert entry["checks"] == [{"function": "no_swap", "after": "03.1 memory limit", "question": "03.1h no swap",
                                "points": 1}] and "def no_swap" in entry["source"]
    assert not any("no_swap" in p.read_text() or "03.1h" in p.read_text() for p in (tmp_path / "class").iterdir())
    assert "1 in hidden checks" in res.stdout


@pytest.mark.parametrize("text,words", [
    (HIDDEN.replace('after="03.1 memory limit"', 'after="03.9 nothing"'), "does not ask"),
    (HIDDEN.replace('question="03.1h no swap"', 'question="03.2 OOM kill"'), "asked twice"),
    (HIDDEN.replace("points=1", "points=n"), "literal"),
    (HIDDEN + "\ndef broken(:\n", "not valid Python"),
])
def test_a_hidden_check_the_grader_could_not_use_is_refused_and_nothing_is_written(tmp_path, text, words):
    import subprocess
    import sys
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / "03-cgroups.py").write_text(text)
    res = subprocess.run([sys.executable, "-m", "labkit.cli", "assign", "--output", str(tmp_path / "class"),
                          "--bundle", str(tmp_path / "bundle.json"), "--hidden", str(tmp_path / "hidden")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and words in res.stderr, res.stderr
    assert not (tmp_path / "class").exists() and not (tmp_path / "bundle.json").exists()


def test_ref_of_names_live_objects_digests_records_and_keeps_plain_answers():
    from labkit.client.handles import Cgroup, Container
    from labkit.client.records import Record
    from labkit.course.grading import ref_of
    from labkit.wire.specs import CgroupSpec
    assert ref_of(Cgroup(None, CgroupSpec(name="student-mem"), Record())) == {"kind": "cgroup", "name": "student-mem"}
    assert ref_of(Container(None, "abc123", "web", Record())) == {"kind": "container", "name": "abc123"}
    rec = Record(steps=[{"kind": "syscall", "call": "chroot"}], facts={"x": 1})
    assert ref_of(rec)["kind"] == "record" and len(ref_of(rec)["digest"]) == 64
    assert ref_of(None) == {"kind": "none"} and ref_of(...) == {"kind": "none"}
    assert ref_of("6.1.0") == {"kind": "value", "value": "6.1.0"} and ref_of({"a": [1, 2]})["value"] == {"a": [1, 2]}
    assert ref_of(ValueError("used by container web")) == {"kind": "error", "type": "ValueError",
                                                          "message": "used by container web"}
    assert ref_of("x" * 100000) == {"kind": "object", "type": "str"}, "a huge answer is not carried"
    assert ref_of(float("nan")) == {"kind": "object", "type": "float"}
    assert ref_of(object())["kind"] == "object"


def test_the_score_output_carries_the_refs(capsys):
    from labkit.course.grading import REFS_MIME
    shown = []
    import labkit.course.grading as g
    real = g._display
    g._display = lambda score, refs=None, **shown_as: shown.append((score, refs))
    try:
        c = Checker(None, "t", "s1")
        c.check("q1", 2, lambda lab, x: (True, "ok"), "answer")
    finally:
        g._display = real
    [(score, refs)] = shown
    assert score["points"] == 2 and refs == {"question": "q1", "check": "<lambda>",
                                             "args": [{"kind": "value", "value": "answer"}], "kwargs": {}}
    assert REFS_MIME != MIME


# -- lab 09's pure checks: the student's scheduler and reconcile step, judged case by case -----------------

def _spread_cases():
    from labkit.course.orchestrate import node as N, task as T
    three = [N("manager"), N("worker1"), N("worker2")]
    return [
        {"title": "empty", "service": "web", "nodes": three, "tasks": []},
        {"title": "drained", "service": "web", "nodes": [N("manager", availability="drain"), N("worker1")], "tasks": []},
        {"title": "down", "service": "web", "nodes": [N("manager"), N("worker1", status="down"), N("worker2")],
         "tasks": [T("a1", "web", 1, "manager")]},
        {"title": "totals", "service": "web", "nodes": three,
         "tasks": [T("a1", "web", 1, "manager"), T("a2", "web", 2, "worker1"), T("a3", "web", 3, "worker2"),
                   T("b1", "db", 1, "manager")]},
        {"title": "ended", "service": "web", "nodes": three,
         "tasks": [T("a1", "web", 1, "manager"), T("a2", "web", 2, "worker1", state="failed")]},
        {"title": "nowhere", "service": "web", "nodes": [N("manager", status="down")], "tasks": []},
    ]


def test_spread_cases_are_judged_by_the_library_scheduler_with_partial_credit():
    from labkit.course import checks
    from labkit.course.orchestrate import spread_args
    from labkit.wire.orchestration import schedule
    cases = _spread_cases()
    right = [schedule(s, 1, nodes, tasks) for s, nodes, tasks in map(spread_args, cases)]
    assert right == ["manager", "worker1", "worker2", "worker1", "worker1", None]
    assert checks.spread_cases(None, cases, right)[0] is True
    naive = ["manager"] * len(cases)  # "always the first node": wrong where a node may not or should not take it
    frac, why = checks.spread_cases(None, cases, naive)
    assert frac == 1 / 6 and "'drained' (you chose 'manager')" in why and "'empty'" not in why.split("not:")[1]
    assert checks.spread_cases(None, cases, right[:-1])[0] is False, "an answer per case"
    easy = [c for c in cases if all(n["status"] == "ready" for n in c["nodes"])] * 2  # cases the student made easy
    frac, why = checks.spread_cases(None, easy, ["manager"] * len(easy))
    assert frac is False and "not the notebook's" in why


def _reconcile_cases():
    from labkit.course.orchestrate import node as N, service as S, task as T
    three = [N("manager"), N("worker1"), N("worker2")]
    web3 = [T("a1", "web", 1, "manager"), T("a2", "web", 2, "worker1"), T("a3", "web", 3, "worker2")]
    return [
        {"title": "new", "services": {"web": S("web", 3)}, "nodes": three, "tasks": []},
        {"title": "died", "services": {"web": S("web", 3)},
         "nodes": [N("manager"), N("worker1", status="down"), N("worker2")], "tasks": web3},
        {"title": "down to 1", "services": {"web": S("web", 1)}, "nodes": three, "tasks": web3},
        {"title": "failed", "services": {"web": S("web", 2)}, "nodes": three,
         "tasks": [T("a1", "web", 1, "manager"), T("a2", "web", 2, "worker1", state="failed")]},
        {"title": "steady", "services": {"web": S("web", 3)}, "nodes": three, "tasks": web3},
    ]


def test_reconcile_cases_compare_the_actions_as_a_set_and_name_the_cases_gone_wrong():
    from labkit.course import checks
    from labkit.course.orchestrate import actions_text, reconcile_args, summary
    from labkit.wire.orchestration import reconcile
    cases = _reconcile_cases()
    right = [summary(reconcile(*reconcile_args(c))) for c in cases]
    assert [len(r) for r in right] == [3, 2, 2, 1, 0]
    assert actions_text(right[1]) == "mark a2 (web.2) orphaned\nstart web.2 on manager"
    assert checks.reconcile_cases(None, cases, right)[0] is True
    assert checks.reconcile_cases(None, cases, [list(reversed(r)) for r in right])[0] is True, "order is free"
    forgetful = [list(r) for r in right]  # a step that does not count its own starts: all three on the manager
    forgetful[0] = [dict(a, node="manager") for a in right[0]]
    frac, why = checks.reconcile_cases(None, cases, forgetful)
    assert frac == 4 / 5 and "'new'" in why and "'died'" not in why
    assert checks.reconcile_cases(None, cases, [[] for _ in cases])[0] is False
    with pytest.raises(TypeError):
        summary(["start web.1"])  # the step must return Action objects


def test_a_timeline_says_when_the_service_was_whole_again_and_what_failed():
    import pandas as pd
    from labkit.course import plotting
    from labkit.course.orchestrate import Timeline
    samples = pd.DataFrame({"t": [0.0, 0.5, 1.0, 1.5, 2.0], "manager": [1, 1, 1, 2, 2], "worker1": [1, 1, 0, 0, 0],
                            "worker2": [1, 1, 1, 1, 1]})
    requests = pd.DataFrame({"t": [0.1, 0.6, 0.7, 1.2, 2.5], "ok": [True, False, True, True, False],
                             "answer": ["a", "TimeoutError", "b", "c", "TimeoutError"]})
    tl = Timeline("web", 3, samples, [(0.5, "worker1's power cut")], requests)
    assert tl.recovered(away_from="worker1") == 1.0 and tl.recovered() == 0.0
    assert tl.failed() == (1, 4), "only the requests made while the samples were taken"
    assert Timeline("web", 3, samples.iloc[:3], [(0.5, "cut")]).recovered("worker1") is None
    fig = plotting.recovery_chart(tl, away_from="worker1")
    assert len(fig.axes) == 2 and "power cut" in fig.axes[1].get_xlabel()
    rollout = pd.DataFrame({"t": [0.0, 0.0, 0.5, 0.5], "slot": [1, 2, 1, 2], "state": ["running", "running",
                            "starting", "running"], "image": ["busybox:latest", "busybox:latest", "course/web:v2",
                                                              "busybox:latest"]})
    fig = plotting.rollout_chart(rollout)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["slot 1", "slot 2"]


def test_a_check_renders_as_a_badge_and_the_notebook_ends_with_a_score_table(monkeypatch):
    """JupyterLab shows each check as a PASS / PARTIAL / NOT YET badge with its feedback (escaped: feedback may
    carry a student's text), and the summary as the student's table of every question; the score itself stays
    under its MIME type for the grader."""
    import IPython.display
    from labkit.course import grading
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda data, raw=False: shown.append(data))
    c = grading.Checker(None, "06-mini-docker", "alice")
    for frac, q in ((1.0, "q1"), (0.5, "q2"), (0.0, "q3")):
        c.check(q, 2, lambda lab, f=frac: (f, "<script>x</script>"))
    c.summary()
    badges = [d["text/html"] for d in shown[:3]]
    assert ["PASS" in badges[0], "PARTIAL" in badges[1], "NOT YET" in badges[2]] == [True] * 3
    assert all("<script>" not in b and "&lt;script&gt;" in b for b in badges)
    table = shown[3]["text/html"]
    assert table.count("<tr><td>") == 3 and "3 / 6" in table and "PARTIAL" in table
    assert shown[3][grading.MIME]["question"] == "total" and shown[3]["text/plain"].startswith("[PART] total: 3/6")
