"""Editions: the instructor's notebooks carry solutions between markers; students get them blank, and
the grader gets a bundle of what it must restore and count.

In a source cell, the student's line comes first (e.g. ``box = None  # start a process ...``) and the
solution follows between ``### BEGIN SOLUTION`` and ``### END SOLUTION``; the student edition drops
the solution lines, so a blank notebook still runs to the end and its checks record zero with a reason.

A check cell is a code cell tagged ``check`` that calls ``check.check(QUESTION, POINTS, ...)`` with
literal question names and points. The grading bundle (:func:`grading_bundle`) holds, for every
notebook, each check cell's id, source and questions, the order of the source's cells, and a hash of
the source, so that the grader can put every check cell back exactly as written, wherever a
submission moved, edited, retagged or deleted it.

Hidden checks live outside the repository, one Python file per notebook (``HIDDEN_DIR/NN-title.py``),
each check a function decorated with ``@hidden(after=QUESTION, question=NAME, points=N)``
(:func:`hidden`): the grader runs it, in its own process, with the same arguments as the visible check
``after`` names. The bundle carries each file's text and its checks (read with ``ast``, nothing run);
students never see either (the student edition has no hidden check; the feedback shows a hidden
check's result and message, never its code).
"""
import ast
import hashlib
import json
import os

from ..wire.errors import InvalidSpec

CHECK_TAG = "check"
BUNDLE_FORMAT = 1


def hidden(after, question, points):
    """Mark a function in a hidden-checks file as the hidden check ``question`` worth ``points``, run with
    the arguments of the visible check ``after``. The function is returned unchanged (with its marks)."""
    def mark(fn):
        fn.hidden = {"after": after, "question": question, "points": points}
        return fn
    return mark

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


def strip_source(source):
    out, inside = [], False
    for line in source.splitlines(True):
        s = line.strip()
        if s == BEGIN:
            inside = True
            continue
        if s == END:
            inside = False
            continue
        if not inside:
            out.append(line)
    return "".join(out).rstrip("\n")


def student_edition(nb):
    """A copy of notebook dict ``nb`` with solutions removed and outputs cleared."""
    nb = json.loads(json.dumps(nb))
    # the instructor's notebooks are paired with their text source (jupytext); a student's copy is not
    nb.get("metadata", {}).pop("jupytext", None)
    for cell in nb.get("cells", []):
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if cell.get("cell_type") == "code":
            cell["source"] = strip_source(src)
            cell["outputs"], cell["execution_count"] = [], None
    return nb


def write_student_editions(src_dir, out_dir, keep=False):
    """A student edition of every course notebook in ``src_dir``, written to ``out_dir``; their paths.
    ``keep``: a notebook already there is a student's work and stays as it is (only missing ones are written)."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for fn in course_notebooks(src_dir):
        path = os.path.join(out_dir, fn)
        if keep and os.path.lexists(path):
            continue
        with open(os.path.join(src_dir, fn), encoding="utf-8") as f:
            nb = json.load(f)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(student_edition(nb), f, indent=1, ensure_ascii=False)
            f.write("\n")
        written.append(path)
    return written


def _source(cell):
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def check_questions(source, where="a check cell"):
    """The (question, points, check) that a check cell's ``check.check(...)`` calls name, in order: literal
    question and points, and the check as ``checks.NAME`` (the grader reads them without running anything,
    and runs its own ``labkit.course.checks.NAME``, whatever the student's kernel did to that module)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise InvalidSpec(f"{where} is not valid Python: {exc}", fix="fix the cell in the source notebook") from None
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "check":
            try:
                question, points = ast.literal_eval(node.args[0]), ast.literal_eval(node.args[1])
            except (IndexError, ValueError):
                raise InvalidSpec(f"{where}: check.check(...) needs a literal question and literal points",
                                  fix='write e.g. check.check("03.1 memory limit", 2, checks.memory_limit, mem)') from None
            if not isinstance(question, str) or isinstance(points, bool) or not isinstance(points, (int, float)):
                raise InvalidSpec(f"{where}: question {question!r} / points {points!r}",
                                  fix="a question is a string, its points a number")
            fn = node.args[2] if len(node.args) > 2 else None
            if not (isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id == "checks"):
                raise InvalidSpec(f"{where}: check.check(...) names its check as checks.NAME",
                                  fix='e.g. check.check("03.1 memory limit", 2, checks.memory_limit, mem)')
            out.append((question, points, fn.attr))
    return sorted(out, key=lambda qp: source.find(repr(qp[0])[1:-1]))


def notebook_bundle(nb, name="notebook"):
    """What the grader needs of one source notebook: its check cells by id, their questions, the order
    of its cells, and the hash of its cells' sources and ids."""
    cells = nb.get("cells", [])
    ids = [c.get("id") for c in cells]
    if any(not i for i in ids) or len(set(ids)) != len(ids):
        raise InvalidSpec(f"{name}: every cell needs an id of its own",
                          fix="build the notebook from its text source (python -m labkit.course.notebooks build)")
    checks, questions = {}, set()
    for c in cells:
        src = _source(c)
        tagged = CHECK_TAG in (c.get("metadata", {}).get("tags") or [])
        calls = c.get("cell_type") == "code" and "check.check(" in src
        if tagged != calls:
            raise InvalidSpec(f"{name}, cell {c['id']}: a cell that calls check.check(...) must be tagged "
                              f"{CHECK_TAG!r}, and only such a cell", fix="tag it (or untag it) in the source")
        if not tagged:
            continue
        qs = check_questions(src, f"{name}, cell {c['id']}")
        for q, _, _ in qs:
            if q in questions:
                raise InvalidSpec(f"{name}: question {q!r} is asked twice", fix="give every question a name of its own")
            questions.add(q)
        checks[c["id"]] = {"source": src, "questions": [{"question": q, "points": p, "check": f} for q, p, f in qs]}
    digest = hashlib.sha256(json.dumps([[c.get("id"), c.get("cell_type"), _source(c)] for c in cells],
                                       ensure_ascii=False).encode()).hexdigest()
    return {"cells": ids, "checks": checks, "source_sha256": digest,
            "points": sum(q["points"] for c in checks.values() for q in c["questions"])}


def course_notebooks(src_dir):
    """The course notebooks in ``src_dir`` (``NN-title.ipynb``), in order."""
    return sorted(fn for fn in os.listdir(src_dir) if fn.endswith(".ipynb") and fn[:2].isdigit())


def hidden_checks(source, name="hidden checks"):
    """The hidden checks a hidden-checks file declares: [{'function', 'after', 'question', 'points'}], read
    from its decorators with ``ast`` (nothing is run)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise InvalidSpec(f"{name} is not valid Python: {exc}", fix="fix the file") from None
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == "hidden":
                try:
                    kw = {k.arg: ast.literal_eval(k.value) for k in dec.keywords}
                except ValueError:
                    kw = {}
                if set(kw) != {"after", "question", "points"} or not isinstance(kw["question"], str) \
                        or isinstance(kw["points"], bool) or not isinstance(kw["points"], (int, float)):
                    raise InvalidSpec(f"{name}: {node.name} needs @hidden(after=..., question=..., points=...) "
                                      "with literal values", fix='e.g. @hidden(after="03.1 memory limit", '
                                                                 'question="03.1h no swap", points=1)')
                out.append(dict(kw, function=node.name))
    return out


def _hidden_entry(hidden_dir, stem, nbundle):
    path = os.path.join(hidden_dir, stem + ".py")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        source = f.read()
    checks = hidden_checks(source, path)
    asked = {q["question"] for c in nbundle["checks"].values() for q in c["questions"]}
    for h in checks:
        if h["after"] not in asked:
            raise InvalidSpec(f"{path}: {h['function']} follows {h['after']!r}, which {stem} does not ask",
                              fix="after= must name a visible question of that notebook: " + ", ".join(sorted(asked)))
        if h["question"] in asked:
            raise InvalidSpec(f"{path}: question {h['question']!r} is asked twice", fix="give it a name of its own")
        asked.add(h["question"])
    return {"source": source, "checks": checks, "points": sum(h["points"] for h in checks)}


def grading_bundle(src_dir, hidden_dir=None):
    """The grading bundle of every course notebook in ``src_dir`` (see the module's docstring), with the
    hidden checks of ``hidden_dir`` when given."""
    from ..wire.protocol import VERSION
    notebooks = {}
    for fn in course_notebooks(src_dir):
        with open(os.path.join(src_dir, fn), encoding="utf-8") as f:
            stem = fn[:-len(".ipynb")]
            notebooks[stem] = entry = notebook_bundle(json.load(f), fn)
        hidden_entry = _hidden_entry(hidden_dir, stem, entry) if hidden_dir else None
        if hidden_entry:
            entry["hidden"] = hidden_entry
    digest = hashlib.sha256(json.dumps({k: v["source_sha256"] for k, v in notebooks.items()},
                                       sort_keys=True).encode()).hexdigest()
    return {"format": BUNDLE_FORMAT, "labkit": VERSION, "source_sha256": digest, "notebooks": notebooks}


def write_bundle(src_dir, path, hidden_dir=None):
    """Write the grading bundle to ``path`` (keep it from students: it holds the hidden checks)."""
    if hidden_dir and not os.path.isdir(hidden_dir):
        raise InvalidSpec(f"no hidden-checks folder {hidden_dir}", fix="give the folder that holds NN-title.py files")
    bundle = grading_bundle(src_dir, hidden_dir)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(bundle, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return bundle
