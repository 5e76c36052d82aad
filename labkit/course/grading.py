"""Grading inside a notebook: checks record points as structured output that survives papermill.

``Checker(lab, notebook, student_id).check(question, points, fn, *args)`` calls a check from
:mod:`labkit.course.checks` (which inspects the live state on the target), prints feedback a student
understands, and displays the score under the MIME type :data:`MIME`, which papermill keeps in the
executed notebook. A check never raises: an unanswered question or an error scores zero with the
reason, so the notebook always runs to the end. ``read_scores(path)`` reads the scores back.
"""
import json
import traceback

from ..wire.errors import LabkitError

MIME = "application/vnd.labkit.score+json"


class NotAnswered(Exception):
    """The exercise was left blank."""


class Checker:
    def __init__(self, lab, notebook, student_id="anonymous"):
        self.lab, self.notebook, self.student_id = lab, notebook, student_id
        self.results = []

    def check(self, question, points, fn, *args, **kwargs):
        """Run ``fn(lab, *args)`` -> (fraction 0..1 or bool, feedback); display and record the score.

        Returns nothing (the score is displayed once, not echoed again); see ``self.results``."""
        try:
            unavailable = getattr(fn, "unavailable", None)  # e.g. checks.needs_vm: the target lacks what it needs
            why = unavailable(self.lab) if unavailable else None
            if why:
                got, feedback = False, why
            elif any(a is None or a is Ellipsis for a in args):
                raise NotAnswered()
            else:
                got, feedback = fn(self.lab, *args, **kwargs)
            frac = float(got) if not isinstance(got, bool) else (1.0 if got else 0.0)
            frac = min(max(frac, 0.0), 1.0)
        except NotAnswered:
            frac, feedback = 0.0, "not answered yet: replace the ... / None in the exercise cell and run it again"
        except LabkitError as exc:
            frac, feedback = 0.0, f"the check could not confirm your answer: {exc}"
        except Exception as exc:  # noqa: BLE001 - a broken answer scores zero, never stops the notebook
            frac, feedback = 0.0, (f"your answer raised {type(exc).__name__}: {exc}\n"
                                   + "".join(traceback.format_exc(limit=2).splitlines(True)[-3:]))
        score = {"notebook": self.notebook, "question": question, "points": round(points * frac, 2),
                 "max_points": points, "passed": frac >= 1.0, "feedback": feedback, "student": self.student_id}
        self.results.append(score)
        _display(score)

    @property
    def total(self):
        return sum(r["points"] for r in self.results), sum(r["max_points"] for r in self.results)

    def summary(self):
        got, out_of = self.total
        score = {"notebook": self.notebook, "question": "total", "points": got, "max_points": out_of,
                 "passed": got >= out_of, "feedback": f"{got:g} of {out_of:g} points", "student": self.student_id}
        _display(score)


def _text(score):
    mark = "PASS" if score["passed"] else ("PART" if score["points"] > 0 else "----")
    return f"[{mark}] {score['question']}: {score['points']:g}/{score['max_points']:g}  {score['feedback']}"


def _display(score):
    try:
        from IPython.display import display
        display({MIME: score, "text/plain": _text(score)}, raw=True)
    except ImportError:
        print(_text(score))


def read_scores(path_or_nb):
    """All scores recorded in an executed notebook (path or nbformat/JSON dict), in cell order."""
    if isinstance(path_or_nb, (str, bytes)) or hasattr(path_or_nb, "__fspath__"):
        with open(path_or_nb, encoding="utf-8") as f:
            nb = json.load(f)
    else:
        nb = path_or_nb
    out = []
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []) or []:
            data = o.get("data") or {}
            if MIME in data:
                out.append(data[MIME])
    return out
