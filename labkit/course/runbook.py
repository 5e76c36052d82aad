"""Executing the course's notebooks headless (papermill) and reading back what each one scored.

``run_notebooks(target, output)`` executes every notebook (or the ones named) in course order into
``output``, one :class:`NotebookRun` each: its points read back from the executed notebook
(:func:`labkit.course.grading.read_scores`), how long it took, and the error that stopped it, if one did. A
notebook that fails does not stop the others. ``read_runs(output)`` reads an output folder back, so a
CI job or an instructor can check a run it did not make (``labkit scores DIR``).

Each executed notebook is signed as trusted for the user who ran it (Jupyter's own notebook signatures):
they are the course's notebooks, run by that user on their own target, so JupyterLab opened on them later
shows the step widgets and live views in their final state from the widget state papermill saved (an
untrusted notebook shows only their text). Notebooks that anyone else wrote, such as a class's
submissions executed by ``labkit grade``, are never signed.
"""
import os
import time
from dataclasses import dataclass, field

from . import NOTEBOOK_DIR
from .grading import read_scores



def course_notebooks(source_dir=NOTEBOOK_DIR):
    """The course's notebooks in order: ``NN-title.ipynb``."""
    return sorted(f for f in os.listdir(source_dir) if f.endswith(".ipynb") and f[:2].isdigit())


def pick_notebooks(names, source_dir=NOTEBOOK_DIR):
    """The course notebooks ``names`` ask for, each given as its file name, without ``.ipynb``, or by its number
    ("06"); an unknown name is an InvalidSpec that lists the course's."""
    from ..wire.errors import InvalidSpec
    known = course_notebooks(source_dir)
    picked = []
    for name in names:
        found = [f for f in known if name in (f, f[:-len(".ipynb")], f[:2])]
        if len(found) != 1:
            raise InvalidSpec(f"{name!r} is not one of the course's notebooks",
                              fix="name one of " + ", ".join(f[:-len(".ipynb")] for f in known) + " (or its number)")
        picked.append(found[0])
    return picked


@dataclass
class NotebookRun:
    name: str
    path: str
    scores: list = field(default_factory=list)
    seconds: float = None
    error: str = None

    @property
    def total(self):
        """(points, max_points) from the notebook's 'total' line, else summed over its questions."""
        totals = [s for s in self.scores if s.get("question") == "total"]
        if totals:
            return totals[-1]["points"], totals[-1]["max_points"]
        qs = self.questions
        return sum(s["points"] for s in qs), sum(s["max_points"] for s in qs)

    @property
    def questions(self):
        return [s for s in self.scores if s.get("question") != "total"]

    @property
    def full(self):
        """Ran to the end and every question has all its points."""
        got, out_of = self.total
        return (self.error is None and bool(self.questions) and out_of > 0 and got >= out_of
                and all(s["points"] >= s["max_points"] for s in self.questions))

    def line(self):
        got, out_of = self.total
        took = "" if self.seconds is None else f"  {self.seconds:6.1f} s"
        head = f"{self.name:<30} {got:5g}/{out_of:<4g} points{took}"
        if self.error:
            return head + f"  FAILED: {self.error}"
        short = [f"{s['question']} {s['points']:g}/{s['max_points']:g}" for s in self.questions
                 if s["points"] < s["max_points"]]
        return head + ("  short: " + "; ".join(short) if short else "")


def run_notebooks(target, output, notebooks=None, student_id="anonymous", quick=True, timeout=900,
                  source_dir=NOTEBOOK_DIR, on_done=None, lang=None, parameters=None):
    """Execute notebooks with papermill into ``output``; a list of :class:`NotebookRun`. ``on_done(run)``
    is called as each one finishes (the lab command prints its line there); ``lang``: the edition's language,
    which the checks' feedback is shown in (labkit.course.feedback; None: the edition's folder says, e.g. ko);
    ``parameters``: a notebook's own parameters besides these (lab 09's ``worker_vms``)."""
    import papermill as pm
    from .feedback import edition_of
    lang = lang or edition_of(source_dir)
    os.makedirs(output, exist_ok=True)
    runs = []
    # the kernels inherit these: step widgets play to the end (labkit.course.steps); feedback in the edition's words
    saved = {k: os.environ.get(k) for k in ("LABKIT_HEADLESS", "LABKIT_LANG")}
    os.environ.update(LABKIT_HEADLESS="1", LABKIT_LANG=lang)
    try:
        return _run_each(pm, target, output, notebooks, student_id, quick, timeout, source_dir, on_done, runs,
                         dict(parameters or {}))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_each(pm, target, output, notebooks, student_id, quick, timeout, source_dir, on_done, runs, extra):
    for name in notebooks or course_notebooks(source_dir):
        out = os.path.join(output, name)
        started, error = time.monotonic(), None
        try:
            pm.execute_notebook(os.path.join(source_dir, name), out, cwd=output, kernel_name="python3",
                                parameters={**extra, "target": target, "student_id": student_id, "quick": quick,
                                            "output_dir": os.path.abspath(output)},
                                execution_timeout=timeout, progress_bar=False)
        except Exception as exc:  # noqa: BLE001 - one notebook's failure is reported, the others still run
            error = _describe(exc)
        if os.path.exists(out):
            trust(out)
        run = NotebookRun(name, out, read_scores(out) if os.path.exists(out) else [],
                          time.monotonic() - started, error)
        runs.append(run)
        if on_done:
            on_done(run)
    return runs


def trust(path):
    """Sign an executed course notebook in this user's Jupyter signature store, so JupyterLab renders its saved
    widget state (widgets are not shown in an untrusted notebook). Only for notebooks this user's own run wrote.
    Returns whether it was signed: a store that cannot be written (a read-only home) costs only the widgets."""
    import nbformat
    from nbformat.sign import NotebookNotary
    try:
        nb = nbformat.read(path, as_version=4)
        NotebookNotary().sign(nb)
        return True
    except Exception:  # noqa: BLE001 - sqlite or the home folder: the notebook itself is fine
        return False


def _describe(exc):
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        cell = getattr(exc, "exec_count", None)
        return f"{ename}: {evalue}" + (f" (cell [{cell}])" if cell is not None else "")
    return f"{type(exc).__name__}: {exc}"


def read_runs(output, expected=None):
    """The executed notebooks in ``output`` as NotebookRuns (times and failures from papermill's metadata); each name in ``expected`` that has
    no executed notebook there becomes a run with the error 'not executed'."""
    import json
    have = course_notebooks(output) if os.path.isdir(output) else []
    runs = []
    for name in have:
        path = os.path.join(output, name)
        with open(path, encoding="utf-8") as f:
            nb = json.load(f)
        pm = (nb.get("metadata") or {}).get("papermill") or {}
        runs.append(NotebookRun(name, path, read_scores(nb), pm.get("duration"),
                                "papermill recorded an exception: open the notebook" if pm.get("exception") else None))
    for name in expected or ():
        if name not in have:
            runs.append(NotebookRun(name, os.path.join(output, name), error="not executed: no such file in "
                                    + output))
    return sorted(runs, key=lambda r: r.name)
