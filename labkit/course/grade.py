"""Grading a class: what the grader does to a submitted notebook before, while and after it runs.

This module owns the first part: reading a submission without trusting it, and restoring it against
the grading bundle (:func:`labkit.course.assign.grading_bundle`) so that only the grader's own check
cells are run and only their outputs can count:

- every output and execution count is dropped, also the ``outputs`` a markdown or raw cell should not
  have (papermill keeps them) — nothing a student displayed survives;
- every check cell of the bundle is put back by its id, with the instructor's source and tags, where the
  student left it; a check cell the student deleted comes back after the nearest cell before it in the
  source that the submission still has; a cell that only looks like one (copied, or given the ``check``
  tag) is the student's code and loses the tag;
- what was changed is listed in the result's ``notes``, which the feedback shows.

Standard library only (nbformat's JSON is read and written as plain JSON).
"""
import copy
import json
import os

from ..wire.errors import LabkitError
from .assign import CHECK_TAG

#: the largest submission read (a course notebook with its outputs is well under 1 MiB)
MAX_SUBMISSION = 16 << 20


class BadSubmission(LabkitError):
    """A submitted file that is not a notebook the grader can run; its row in the gradebook says why."""
    default_fix = "submit the .ipynb file saved by JupyterLab (File > Save), not a copy edited by hand"


def read_submission(path, max_bytes=MAX_SUBMISSION):
    """A submitted notebook as a dict, or BadSubmission with the reason (too big, not JSON, not nbformat 4)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise BadSubmission(f"{path}: cannot be read ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise BadSubmission(f"{os.path.basename(path)} is larger than {max_bytes >> 20} MiB")
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadSubmission(f"{os.path.basename(path)} is not a notebook: {str(exc)[:200]}") from None
    if not isinstance(nb, dict) or nb.get("nbformat") != 4 or not isinstance(nb.get("cells"), list):
        raise BadSubmission(f"{os.path.basename(path)} is not an nbformat 4 notebook")
    for c in nb["cells"]:
        if not isinstance(c, dict) or c.get("cell_type") not in ("code", "markdown", "raw"):
            raise BadSubmission(f"{os.path.basename(path)} has a cell that is not a notebook cell")
    return nb


def _source(cell):
    src = cell.get("source", "")
    if isinstance(src, list):
        src = "".join(s for s in src if isinstance(s, str))
    return src if isinstance(src, str) else ""


def _tags(cell):
    meta = cell.get("metadata") if isinstance(cell.get("metadata"), dict) else {}
    tags = meta.get("tags")
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _check_cell(source_cell, entry):
    cell = {k: copy.deepcopy(v) for k, v in source_cell.items() if k in ("cell_type", "id", "metadata")}
    cell["source"] = entry["source"]
    return cell


def restore(nb, source_nb, nbundle):
    """The notebook to run for submission ``nb``: outputs gone, the bundle's check cells back as written.

    ``source_nb`` is the instructor's notebook (for the check cells' metadata), ``nbundle`` its entry in
    the grading bundle. Returns (notebook, notes)."""
    notes = []
    source_cells = {c["id"]: c for c in source_nb["cells"]}
    checks = nbundle["checks"]
    out, seen = [], set()
    for cell in nb["cells"]:
        cid = cell.get("id")
        if not isinstance(cid, str) or cid in seen:
            cid = None  # a repeated id (a copied cell) is not that cell twice: it gets an id of its own
            cell = {k: v for k, v in cell.items() if k != "id"}
        else:
            seen.add(cid)
        if cid in checks:
            restored = _check_cell(source_cells[cid], checks[cid])
            if _source(cell) != checks[cid]["source"] or cell.get("cell_type") != "code" \
                    or CHECK_TAG not in _tags(cell):
                notes.append(f"check cell {cid} was changed: put back as written")
            out.append(restored)
            continue
        cell = {k: copy.deepcopy(v) for k, v in cell.items() if k in ("cell_type", "id", "metadata", "source")}
        cell["source"] = _source(cell)
        meta = cell.get("metadata") if isinstance(cell.get("metadata"), dict) else {}
        if CHECK_TAG in _tags(cell):
            meta = dict(meta, tags=[t for t in _tags(cell) if t != CHECK_TAG])
            notes.append(f"cell {cid or '(no id)'} is not a check cell: its {CHECK_TAG!r} tag is dropped")
        cell["metadata"] = meta
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        out.append(cell)
    # check cells the submission lost: back after the nearest earlier source cell it still has
    order = nbundle["cells"]
    for cid in order:
        if cid not in checks or any(c.get("id") == cid for c in out):
            continue
        before = order[:order.index(cid)]
        at = 0
        for prev in reversed(before):
            hits = [i for i, c in enumerate(out) if c.get("id") == prev]
            if hits:
                at = hits[0] + 1
                break
        out.insert(at, _check_cell(source_cells[cid], checks[cid]))
        notes.append(f"check cell {cid} was missing: put back")
    for c in out:
        if c.get("cell_type") == "code":
            c["outputs"], c["execution_count"] = [], None
        else:
            c.pop("outputs", None)
            c.pop("execution_count", None)
    restored = {"cells": out, "metadata": copy.deepcopy(source_nb.get("metadata", {})), "nbformat": 4,
                "nbformat_minor": 5}
    restored["metadata"].pop("jupytext", None)
    taken = {c.get("id") for c in out}
    n = 0
    for c in out:  # nbformat 4.5 wants an id of its own on every cell
        if "id" not in c:
            while f"lk-{n}" in taken:
                n += 1
            c["id"] = f"lk-{n}"
            taken.add(c["id"])
    return restored, notes


# -- the grader's own run of a check ------------------------------------------------------------------

class Unverifiable:
    """An argument the grader cannot take from the student's kernel (a DataFrame, an object it computed):
    a check given one must decide from the target alone, or score it as not shown."""

    def __init__(self, type_name):
        self.type_name = type_name

    def __repr__(self):
        return f"<not verifiable: a {self.type_name} from the student's kernel>"


class ForgedRecord(LabkitError):
    """A check's record is not one the agent gave this submission (hand-made, edited, or from elsewhere)."""
    default_fix = "pass the record that the lab's call returned, unchanged"


def rebuild(ref, lab, relay=None):
    """One argument of a check as the grader uses it: live objects found on the target by name (NotFound
    when the submission did not leave it), records from the relay's journal (ForgedRecord when absent),
    plain answers as they are, anything else :class:`Unverifiable`."""
    from ..client.records import Record
    from ..wire.errors import InvalidSpec
    if not isinstance(ref, dict):
        raise InvalidSpec(f"a check's argument {ref!r} is not a reference", fix="run the check cell as written")
    kind = ref.get("kind")
    if kind == "none":
        return None
    if kind in ("rootfs", "cgroup", "container", "process", "network", "vm"):
        return lab.find(kind, ref.get("name"))
    if kind == "record":
        found = relay.lookup(ref.get("digest")) if relay is not None else None
        if found is None:
            raise ForgedRecord("the record this check was given is not one the agent returned to this notebook")
        return Record(found)
    if kind == "value":
        return ref.get("value")
    if kind == "error":
        return RuntimeError(str(ref.get("message", ""))[:2000])
    return Unverifiable(str(ref.get("type", "object"))[:80])


def evaluate(check, refs, lab, relay=None):
    """Run ``check(lab, *args)`` in the grader's process, its arguments rebuilt from ``refs`` (what the
    check cell recorded); (fraction 0..1, feedback). Never raises: what the grader cannot rebuild scores
    zero with the reason."""
    from ..wire.errors import NotFound
    try:
        args = [rebuild(r, lab, relay) for r in refs.get("args", [])]
        kwargs = {k: rebuild(r, lab, relay) for k, r in (refs.get("kwargs") or {}).items()}
    except ForgedRecord as exc:
        return 0.0, f"forged or missing record: {exc.message}"
    except NotFound as exc:
        return 0.0, f"not on the target when the grader looked: {exc.message}"
    except LabkitError as exc:
        return 0.0, f"the grader could not rebuild this check's arguments: {exc.message}"
    if any(a is None for a in args):
        return 0.0, "not answered"
    try:
        got, feedback = check(lab, *args, **kwargs)
    except LabkitError as exc:
        return 0.0, f"the check could not confirm the answer: {exc}"
    except Exception as exc:  # noqa: BLE001 - the check met a state it did not expect: zero, with why
        return 0.0, f"the check met {type(exc).__name__}: {exc}"
    frac = float(got) if not isinstance(got, bool) else (1.0 if got else 0.0)
    return min(max(frac, 0.0), 1.0), feedback
