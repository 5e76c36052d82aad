"""How long each lab takes a student, planned from the notebook itself: does it fit a 90-minute session?

A plan, not a measurement, with its rates stated so that a lecturer can disagree with them:

- **reading**: the prose of the markdown cells at :data:`READING_WPM` words a minute (careful reading of a
  technical text; the Korean edition says the same things);
- **demos**: :data:`DEMO_MINUTES` for each demo or picture cell, to run it and read what it shows;
- **exercises**: each exercise cell's ``minutes:N`` tag, the author's plan for working it out, running it and
  reading its check (its instructions are counted under reading);
- an exercise tagged ``extension`` is for students who finish early, or for homework: graded like the others,
  and outside the session's plan. Its heading says so in both editions.

A session is :data:`SESSION_MINUTES`, of which :data:`MACHINE_ALLOWANCE` are kept for starting up and for
waiting on the machine (the lab command prints each notebook's own run time, quick mode). The machine's time is
measured there, never here. ``python -m labkit.course.budget`` prints the README's table; tests/test_budget.py
keeps that copy, the tags and the limit in step.
"""
import math
import os
import re

from . import NOTEBOOK_DIR
from .coverage import between, cells, kind

READING_WPM = 150
DEMO_MINUTES = 1
SESSION_MINUTES = 90
MACHINE_ALLOWANCE = 10
_MINUTES = re.compile(r"minutes:(\d+)$")
_REGION = re.compile(r"<!-- #region[^>]*-->\n(.*?)<!-- #endregion -->", re.S)


def prose_words(text):
    """Words of the prose (markdown regions) of one notebook source, code spans and markup left out."""
    words = 0
    for region in _REGION.findall(text):
        region = re.sub(r"```.*?```", " ", region, flags=re.S)  # a fenced example inside the prose
        words += len(re.findall(r"[\w'’-]+", re.sub(r"[`*_|#>]", " ", region)))
    return words


def exercise_minutes(tags, where):
    """The ``minutes:N`` tag of an exercise cell (ValueError without exactly one, or outside 1-60)."""
    found = [int(m.group(1)) for m in map(_MINUTES.match, tags) if m]
    if len(found) != 1 or not 1 <= found[0] <= 60:
        raise ValueError(f"{where}: an exercise cell needs one tag minutes:N (1-60), the plan for a student's time")
    return found[0]


def plan(path):
    """One notebook's plan: {'lab', 'reading', 'demos', 'exercises': [(cell id, minutes, extension)], 'session',
    'extension'} in minutes (reading rounded up)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    name = os.path.basename(path)
    demos, exercises = 0, []
    for cid, tags, src in cells(path):
        k = kind(tags, src)
        if k == "exercise":
            exercises.append((cid, exercise_minutes(tags, f"{name}, cell {cid}"), "extension" in tags))
            continue
        if any(_MINUTES.match(t) for t in tags) or "extension" in tags:
            raise ValueError(f"{name}, cell {cid}: minutes:N and extension tags belong on exercise cells")
        if k in ("demo", "picture"):
            demos += DEMO_MINUTES
    reading = math.ceil(prose_words(text) / READING_WPM)
    core = sum(m for _, m, ext in exercises if not ext)
    return {"lab": name[:-3], "reading": reading, "demos": demos, "exercises": exercises,
            "session": reading + demos + core, "extension": sum(m for _, m, ext in exercises if ext)}


def plans(source_dir=NOTEBOOK_DIR):
    return [plan(os.path.join(source_dir, n)) for n in sorted(os.listdir(source_dir))
            if n.endswith(".md") and n[:2].isdigit()]


def over(all_plans=None):
    """Labs whose session plan leaves less than the machine's allowance of the session: [(lab, minutes)]."""
    return [(p["lab"], p["session"]) for p in all_plans or plans()
            if p["session"] > SESSION_MINUTES - MACHINE_ALLOWANCE]


def table(all_plans=None):
    """The README's time table (markdown): a row per lab."""
    lines = ["| lab | reading | demos | exercises in the session | planned | extension (if time allows) |",
             "|---|---|---|---|---|---|"]
    for p in all_plans or plans():
        core = [m for _, m, ext in p["exercises"] if not ext]
        ext = [m for _, m, e in p["exercises"] if e]
        lines.append(f"| {p['lab']} | {p['reading']} | {p['demos']} | {sum(core)} ({len(core)}) | "
                     f"**{p['session']}** | " + (f"{sum(ext)} ({len(ext)})" if ext else "—") + " |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- time table: python -m labkit.course.budget -->", "<!-- end of time table -->"


def readme_block(readme_text):
    """The table between the README's markers (None without them)."""
    return between(readme_text, BEGIN, END)


if __name__ == "__main__":
    print(table(), end="")
