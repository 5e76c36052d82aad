"""Grading inside a notebook: checks record points as structured output that survives papermill.

``Checker(lab, notebook, student_id).check(question, points, fn, *args)`` calls a check from
:mod:`labkit.course.checks` (which inspects the live state on the target), prints feedback a student
understands, and displays the score under the MIME type :data:`MIME`, which papermill keeps in the
executed notebook. A check never raises: an unanswered question or an error scores zero with the
reason, so the notebook always runs to the end. ``read_scores(path)`` reads the scores back.

Beside the score, the same output carries under :data:`REFS_MIME` what the check was given, as the grader
can use it in a process of its own (:func:`ref_of`): the names of the objects on the target (a cgroup, a
container, a rootfs, ...), plain answers as values, and a record only by its digest, which the grader's
relay can match to an answer the agent really gave (:mod:`labkit.course.relay`). Nothing in it is trusted
as a score: the grader re-runs the check against the target itself.
"""
import json
import traceback

from ..wire.errors import LabkitError

MIME = "application/vnd.labkit.score+json"
REFS_MIME = "application/vnd.labkit.check+json"
#: the most of a plain answer (as JSON) that the refs carry
MAX_VALUE = 64 << 10


def ref_of(value):
    """What a check's argument is, as the grader can use it elsewhere: a live object by its name on the
    target, a record by its digest, a plain answer by its value; anything else by its type only."""
    from ..client import handles as h
    from ..client.records import record_digest
    if value is None or value is Ellipsis:
        return {"kind": "none"}
    named = {h.Rootfs: ("rootfs", "name"), h.Cgroup: ("cgroup", "name"), h.Network: ("network", "name"),
             h.OverlayRoot: ("overlay", "name"), h.Container: ("container", "id"), h.Process: ("process", "id"),
             h.VirtualMachine: ("vm", "id")}
    for cls, (kind, attr) in named.items():
        if isinstance(value, cls):
            return {"kind": kind, "name": getattr(value, attr)}
    if isinstance(value, BaseException):
        return {"kind": "error", "type": type(value).__name__, "message": str(value)[:2000]}
    digest = record_digest(value)
    if digest:
        return {"kind": "record", "digest": digest}
    if isinstance(value, (str, int, float, bool, list, tuple, dict)):
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            text = None
        if text is not None and len(text) <= MAX_VALUE:
            return {"kind": "value", "value": json.loads(text)}
    return {"kind": "object", "type": type(value).__name__}


class NotAnswered(Exception):
    """The exercise was left blank."""


NOT_ANSWERED = "not answered yet: replace the ... / None in the exercise cell and run it again"


def run_check(lab, fn, args, kwargs=None, not_answered=NOT_ANSWERED):
    """``fn(lab, *args, **kwargs)`` -> (fraction 0..1, feedback), never raising: a check the target cannot run
    (``fn.unavailable``, e.g. checks.needs_vm), an unanswered argument (None or ...) and an error all score
    zero with the reason. The notebook's Checker and the grader (labkit.course.grade.evaluate) both use it."""
    try:
        unavailable = getattr(fn, "unavailable", None)  # e.g. checks.needs_vm: the target lacks what it needs
        why = unavailable(lab) if unavailable else None
        if why:
            got, feedback = False, why
        elif any(a is None or a is Ellipsis for a in args):
            raise NotAnswered()
        else:
            got, feedback = fn(lab, *args, **(kwargs or {}))
        frac = float(got) if not isinstance(got, bool) else (1.0 if got else 0.0)
        return min(max(frac, 0.0), 1.0), feedback
    except NotAnswered:
        return 0.0, not_answered
    except LabkitError as exc:
        return 0.0, f"the check could not confirm your answer: {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken answer scores zero, never stops the notebook
        return 0.0, (f"your answer raised {type(exc).__name__}: {exc}\n"
                     + "".join(traceback.format_exc(limit=2).splitlines(True)[-3:]))


class Checker:
    """``lang``: the language of the feedback shown beside each badge (None: the edition's, see
    :func:`labkit.course.feedback.language`); the score itself keeps the check's English words."""

    def __init__(self, lab, notebook, student_id="anonymous", lang=None):
        from .feedback import language
        self.lab, self.notebook, self.student_id = lab, notebook, student_id
        self.lang = language(lang)
        self.results = []

    def check(self, question, points, fn, *args, **kwargs):
        """Run ``fn(lab, *args)`` -> (fraction 0..1 or bool, feedback); display and record the score.

        Returns nothing (the score is displayed once, not echoed again); see ``self.results``."""
        frac, feedback = run_check(self.lab, fn, args, kwargs)
        score = {"notebook": self.notebook, "question": question, "points": round(points * frac, 2),
                 "max_points": points, "passed": frac >= 1.0, "feedback": feedback, "student": self.student_id}
        self.results.append(score)
        try:
            refs = {"question": question, "check": getattr(fn, "__name__", "?"),
                    "args": [ref_of(a) for a in args], "kwargs": {k: ref_of(v) for k, v in kwargs.items()}}
        except Exception as exc:  # noqa: BLE001 - an odd answer must not stop the notebook
            refs = {"question": question, "error": f"{type(exc).__name__}: {exc}"[:500]}
        _display(score, refs, lang=self.lang)

    @property
    def total(self):
        return sum(r["points"] for r in self.results), sum(r["max_points"] for r in self.results)

    def summary(self):
        """The notebook's total, shown as the student's score table: every question answered here, its points,
        its badge, and the total."""
        got, out_of = self.total
        score = {"notebook": self.notebook, "question": "total", "points": got, "max_points": out_of,
                 "passed": got >= out_of, "feedback": f"{got:g} of {out_of:g} points", "student": self.student_id}
        from .feedback import WORDS
        lang = self.lang
        words = WORDS.get(lang, {})
        rows = "".join(f"<tr><td>{_esc(r['question'])}</td><td>{_badge(r, lang)}</td>"
                       f"<td style='text-align:right'>{r['points']:g} / {r['max_points']:g}</td></tr>" for r in self.results)
        table = (f"<table class='lk-scores'><thead><tr><th>{words.get('question', 'question')}</th><th></th>"
                 f"<th>{words.get('points', 'points')}</th></tr></thead>"
                 f"<tbody>{rows}</tbody><tfoot><tr><th>{words.get('total', 'total')}</th><td>{_badge(score, lang)}</td>"
                 f"<th style='text-align:right'>{got:g} / {out_of:g}</th></tr></tfoot></table>")
        _display(score, html=f"<div><b>{_esc(self.notebook)}</b> — {_esc(self.student_id)}{table}</div>",
                 text="\n".join([_text(score, lang)] + ["  " + _text(r, lang) for r in self.results]))


#: a check's badge: (label, colour) for a full, a partial and a zero score
BADGES = {"pass": ("PASS", "#1b7f3b"), "partial": ("PARTIAL", "#a15c00"), "fail": ("NOT YET", "#b3261e")}


def _status(score):
    return "pass" if score["passed"] else ("partial" if score["points"] > 0 else "fail")


def _esc(text):
    import html
    return html.escape(str(text))


def _badge(score, lang="en"):
    from .feedback import WORDS
    label, colour = BADGES[_status(score)]
    label = WORDS.get(lang, {}).get(_status(score), label)
    return (f"<span style='background:{colour};color:#fff;border-radius:4px;padding:1px 7px;font-weight:bold;"
            f"font-size:85%'>{label}</span>")


def _said(score, lang):
    from .feedback import translate
    return translate(score["feedback"], lang)


def _html(score, lang="en"):
    return (f"<div class='lk-score' style='margin:4px 0'>{_badge(score, lang)} <b>{_esc(score['question'])}</b> "
            f"{score['points']:g}/{score['max_points']:g} <span>{_esc(_said(score, lang))}</span></div>")


def _text(score, lang="en"):
    mark = "PASS" if score["passed"] else ("PART" if score["points"] > 0 else "----")
    return f"[{mark}] {score['question']}: {score['points']:g}/{score['max_points']:g}  {_said(score, lang)}"


def _display(score, refs=None, html=None, text=None, lang="en"):
    """The score as a badge with its feedback in JupyterLab (HTML), a text line elsewhere, and under MIME for the
    grader's reading of an executed notebook (the check's own English there, whatever ``lang`` shows)."""
    try:
        from IPython.display import display
        data = {MIME: score, "text/plain": text or _text(score, lang), "text/html": html or _html(score, lang)}
        if refs is not None:
            data[REFS_MIME] = refs
        display(data, raw=True)
    except ImportError:
        print(text or _text(score, lang))


def read_refs(path_or_nb):
    """What each check was given ({question: refs}), as recorded in an executed notebook."""
    nb = _load(path_or_nb)
    out = {}
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []) or []:
            refs = (o.get("data") or {}).get(REFS_MIME)
            if isinstance(refs, dict) and isinstance(refs.get("question"), str):
                out[refs["question"]] = refs
    return out


def _load(path_or_nb):
    if isinstance(path_or_nb, (str, bytes)) or hasattr(path_or_nb, "__fspath__"):
        with open(path_or_nb, encoding="utf-8") as f:
            return json.load(f)
    return path_or_nb


def read_scores(path_or_nb):
    """All scores recorded in an executed notebook (path or nbformat/JSON dict), in cell order."""
    nb = _load(path_or_nb)
    out = []
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []) or []:
            data = o.get("data") or {}
            if MIME in data:
                out.append(data[MIME])
    return out
