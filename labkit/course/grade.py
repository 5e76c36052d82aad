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
    a check given one must decide from the target alone, or from ``journal``: every call the agent answered
    for this submission (the relay's journal: method, params, ok, result), which the kernel cannot forge."""

    def __init__(self, type_name, journal=()):
        self.type_name, self.journal = type_name, journal

    def called(self, method):
        """The journal's successful answers to ``method``."""
        return [e for e in self.journal if e.get("method") == method and e.get("ok")]

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
    if kind in ("rootfs", "cgroup", "container", "process", "network", "overlay", "vm"):
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
    return Unverifiable(str(ref.get("type", "object"))[:80], relay.journal if relay is not None else ())


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
    from .grading import run_check
    return run_check(lab, check, args, kwargs, not_answered="not answered")


# -- one submitted notebook, run and graded ------------------------------------------------------------

def _named(path, bundle):
    """The course notebook a submission's file name says it is (``NN-title.ipynb``, perhaps with a prefix)."""
    stem = os.path.basename(path)[:-len(".ipynb")] if path.endswith(".ipynb") else os.path.basename(path)
    for name in bundle["notebooks"]:
        if stem == name or stem.endswith("-" + name) or stem.endswith("_" + name):
            return name
    return None


def identify(path, nb, bundle):
    """Which course notebook a submission is: by its file name, else by the cell ids it shares with each
    source notebook."""
    named = _named(path, bundle)
    if named:
        return named
    ids = {c.get("id") for c in nb.get("cells", []) if isinstance(c, dict) and isinstance(c.get("id"), str)}
    best = max(bundle["notebooks"], key=lambda n: len(ids & set(bundle["notebooks"][n]["cells"])), default=None)
    if best and ids & set(bundle["notebooks"][best]["cells"]):
        return best
    raise BadSubmission(f"{os.path.basename(path)} is none of the course's notebooks",
                        fix="submit the notebook under its own name, e.g. 03-cgroups.ipynb")


def _hidden_functions(entry):
    """The hidden checks of one notebook as functions (the instructor's file, run in the grader)."""
    if not entry:
        return {}
    from .assign import hidden
    space = {"__name__": "labkit_hidden_checks", "hidden": hidden}
    exec(compile(entry["source"], "<hidden checks>", "exec"), space)  # noqa: S102 - the instructor's own code
    return {h["question"]: (space[h["function"]], h) for h in entry["checks"]}


def _refs_in(cell, question):
    from .grading import REFS_MIME
    found = None
    for out in cell.get("outputs", []) or []:
        refs = (out.get("data") or {}).get(REFS_MIME) if isinstance(out, dict) else None
        if isinstance(refs, dict) and refs.get("question") == question:
            found = refs
    return found


#: the most times one submission's kernel may die and be started again
MAX_RESTARTS = 3


def _execute(client, node, notes, deadline, cell_timeout, kill_kernel=None):
    """Run every cell: a cell that raises is the student's error (its output shows it), one that runs past
    the cell time limit is interrupted, and one that kills the kernel costs what that kernel held: whatever
    it left running is killed and a fresh kernel runs the cells after it. Either way the notebook goes on to
    its end, or to the submission's ``deadline`` (time.monotonic()), where the rest is not run."""
    from nbclient.util import run_sync
    try:
        _run_cells(client, node, notes, deadline, cell_timeout, kill_kernel)
    finally:  # the kernel manager is the sandbox's, so nbclient leaves its shutdown (and reaping) to us
        try:
            run_sync(client.km.shutdown_kernel)(now=True)
        except Exception:  # noqa: BLE001 - a kernel that is gone already; the sandbox's cgroup goes next
            pass


def _run_cells(client, node, notes, deadline, cell_timeout, kill_kernel):
    import time

    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbclient.util import run_sync
    restarts = 0
    with client.setup_kernel():
        for index, cell in enumerate(node.cells):
            left = deadline - time.monotonic()
            if left <= 0:
                notes.append(f"the submission ran past its time limit: cell {cell.get('id')} and those after it "
                             "were not run")
                break
            client.timeout = max(1, int(min(cell_timeout, left)))
            try:
                client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
                if any(o.get("output_type") == "error" and o.get("ename") == "KeyboardInterrupt"
                       for o in cell.get("outputs", [])):  # nbclient interrupts a cell past its time limit
                    notes.append(f"cell {cell.get('id')} ran past the time limit and was interrupted")
            except CellTimeoutError:
                notes.append(f"cell {cell.get('id')} ran past the time limit and was interrupted")
            except DeadKernelError:
                restarts += 1
                notes.append(f"cell {cell.get('id')} killed the kernel: a fresh one runs the cells after it")
                if restarts > MAX_RESTARTS:
                    raise
                if kill_kernel is not None:
                    kill_kernel()
                run_sync(client.km.restart_kernel)(now=True)
                run_sync(client.kc.wait_for_ready)(timeout=60)


#: seconds one submission may run in all (each cell's own limit is ``cell_timeout``)
SUBMISSION_TIMEOUT = 1800


def _source_notebook(source_dir, name, nbundle):
    """The instructor's notebook ``name``, checked against the bundle it must match."""
    from .assign import notebook_bundle
    with open(os.path.join(source_dir, name + ".ipynb"), encoding="utf-8") as f:
        source_nb = json.load(f)
    if notebook_bundle(source_nb, name)["source_sha256"] != nbundle["source_sha256"]:
        raise LabkitError(f"the source of {name} is not the one the grading bundle was made from",
                          fix="make the bundle again from these notebooks (labkit assign --bundle ...)")
    return source_nb


def grade_notebook(path, bundle, box, source_dir, student_id="anonymous", work_dir=None, cell_timeout=600,
                   submission_timeout=SUBMISSION_TIMEOUT, quick=True):
    """Grade one submitted notebook in ``box`` (an entered :class:`labkit.course.sandbox.Sandbox`: the
    disposable agent the notebook drives and the kernel it runs in): restore it, run it with papermill's
    parameters through a relay, and after each of the bundle's check cells re-run its checks (and the
    hidden ones that follow them) here, in the grader, against ``box.lab``.

    Returns {'student', 'notebook', 'questions': [{question, points, max_points, feedback, hidden}],
    'notes', 'error', 'executed'} — a question the run never reached scores zero with the reason."""
    import tempfile
    import time

    import nbformat
    from nbclient import NotebookClient
    from papermill.parameterize import parameterize_notebook

    from . import checks as checks_module
    from .relay import Relay

    deadline = time.monotonic() + submission_timeout
    lab = box.lab
    result = {"student": student_id, "notebook": None, "questions": [], "notes": [], "error": None,
              "executed": None}
    name = _named(path, bundle)  # known before reading: a broken file still scores zero of its points
    try:
        nb = read_submission(path)
        name = name or identify(path, nb, bundle)
    except BadSubmission as exc:
        result["notebook"], result["error"] = name, exc.message
        for entry in (bundle["notebooks"][name]["checks"].values() if name else ()):
            result["questions"] += [{"question": q["question"], "points": 0, "max_points": q["points"],
                                     "hidden": False, "feedback": f"no notebook to run: {exc.message}"}
                                    for q in entry["questions"]]
        return result
    result["notebook"] = name
    result["lang"] = _edition(nb)
    nbundle = bundle["notebooks"][name]
    source_nb = _source_notebook(source_dir, name, nbundle)
    restored, result["notes"] = restore(nb, source_nb, nbundle)
    hidden = _hidden_functions(nbundle.get("hidden"))
    after = {}
    for q, (fn, h) in hidden.items():
        after.setdefault(h["after"], []).append((q, fn, h))
    scores = {}
    work = work_dir or tempfile.mkdtemp(prefix="lk-grade-")
    os.makedirs(work, exist_ok=True)
    with Relay(lab.transport, os.path.join(box.scratch, "relay.sock"), owner=box.uid,
               max_seconds=max(1.0, min(cell_timeout, submission_timeout))) as relay:
        def on_cell_executed(cell, cell_index, execute_reply):
            entry = nbundle["checks"].get(cell.get("id"))
            if entry is None:
                return
            for q in entry["questions"]:
                refs = _refs_in(cell, q["question"])
                if refs is None:
                    frac, why = 0.0, "the check cell recorded nothing (its cell failed, or the kernel died)"
                else:
                    frac, why = evaluate(getattr(checks_module, q["check"]), refs, lab, relay)
                scores[q["question"]] = {"question": q["question"], "points": round(q["points"] * frac, 2),
                                         "max_points": q["points"], "feedback": why, "hidden": False}
                for hq, fn, h in after.get(q["question"], []):
                    frac, why = evaluate(fn, refs, lab, relay) if refs is not None else \
                        (0.0, "its visible check recorded nothing")
                    scores[hq] = {"question": hq, "points": round(h["points"] * frac, 2), "max_points": h["points"],
                                  "feedback": why, "hidden": True}

        for c in restored["cells"]:  # papermill reads every cell's tags, and writes its own metadata
            c.setdefault("metadata", {}).setdefault("tags", [])
        restored["metadata"]["papermill"] = {}
        node = nbformat.from_dict(restored)
        node = parameterize_notebook(node, {"target": "unix://" + relay.path, "student_id": student_id,
                                            "quick": quick, "output_dir": box.scratch}, kernel_name="python3",
                                     language="python")
        client = NotebookClient(node, km=box.kernel_manager(), timeout=cell_timeout, kernel_name="python3",
                                allow_errors=True, interrupt_on_timeout=True,
                                resources={"metadata": {"path": box.scratch}}, on_cell_executed=on_cell_executed)
        try:
            _execute(client, node, result["notes"], deadline, cell_timeout, box.kill_kernel)
        except Exception as exc:  # noqa: BLE001 - what the run did not reach scores zero, with this reason
            result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:500]
        executed = os.path.join(work, f"{name}.ipynb")
        try:
            nbformat.write(node, executed)
            result["executed"] = executed
        except Exception as exc:  # noqa: BLE001 - the scores stand without the executed copy
            result["notes"].append(f"the executed notebook could not be saved: {type(exc).__name__}: {str(exc)[:200]}")
    for entry in nbundle["checks"].values():
        for q in entry["questions"]:
            result["questions"].append(scores.get(q["question"]) or {
                "question": q["question"], "points": 0, "max_points": q["points"], "hidden": False,
                "feedback": "not reached" + (f": {result['error']}" if result["error"] else "")})
            for hq, _, h in after.get(q["question"], []):
                result["questions"].append(scores.get(hq) or {"question": hq, "points": 0, "max_points": h["points"],
                                                              "hidden": True, "feedback": "not reached"})
    return result


# -- a class: every submission, one gradebook ------------------------------------------------------------

def load_bundle(path):
    """A grading bundle written by :func:`labkit.course.assign.write_bundle`, checked for its format."""
    from .assign import BUNDLE_FORMAT
    try:
        with open(path, encoding="utf-8") as f:
            bundle = json.load(f)
    except (OSError, ValueError) as exc:
        raise LabkitError(f"cannot read the grading bundle {path}: {exc}",
                          fix="make it with labkit assign --bundle FILE") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT or not isinstance(bundle.get("notebooks"), dict):
        raise LabkitError(f"{path} is not a grading bundle of format {BUNDLE_FORMAT}",
                          fix="make it again with this labkit: labkit assign --bundle FILE")
    return bundle


def vm_questions(bundle):
    """The bundle's questions whose checks boot a VM on the agent (``checks.needs_vm``): the grading VM
    cannot, so under ``--sandbox vm`` they score zero with that reason."""
    from . import checks
    out = []
    for nb in bundle.get("notebooks", {}).values():
        for cell in nb.get("checks", {}).values():
            out += [q["question"] for q in cell.get("questions", ())
                    if getattr(getattr(checks, q.get("check", ""), None), "unavailable", None)]
    return sorted(out)


def submissions(paths):
    """(student id, notebook path) for each submission: a folder per student (its .ipynb files), or files
    named ``STUDENT-NN-title.ipynb`` (the student's id is what comes before the notebook's name)."""
    import re
    out = []
    for p in paths:
        if os.path.isdir(p):
            sid = os.path.basename(os.path.normpath(p))
            out += [(sid, os.path.join(p, fn)) for fn in sorted(os.listdir(p)) if fn.endswith(".ipynb")]
        else:
            m = re.match(r"(.+?)[-_](\d\d-[a-z0-9-]+)\.ipynb$", os.path.basename(p))
            out.append((m.group(1) if m else os.path.splitext(os.path.basename(p))[0], p))
    return out


def _safe(name):
    import re
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80] or "_"


def _digest(path, bundle):
    import hashlib
    h = hashlib.sha256(bundle["source_sha256"].encode())
    h.update(json.dumps(bundle.get("notebooks", {}), sort_keys=True).encode())
    try:
        with open(path, "rb") as f:
            h.update(f.read(MAX_SUBMISSION + 1))
    except OSError:
        h.update(b"unreadable")
    return h.hexdigest()


def grade_submission(task, host, target=None):
    """One submission, start to end, in a sandbox of its own: the unit of work that ``--jobs`` and Dask
    workers run. ``task`` is a plain dict (it crosses to Dask workers): student, path, bundle, source_dir,
    work_dir, sandbox, hide, cell_timeout, submission_timeout; ``host`` a Lab on this machine (root), for
    the sandbox's cgroups; ``target`` the disposable target when ``task['sandbox'] == 'target'``."""
    import time

    from .sandbox import Sandbox
    started = time.perf_counter()
    box = Sandbox(host, sandbox=task["sandbox"], target=target, hide=task.get("hide", ())).__enter__()
    try:
        res = grade_notebook(task["path"], task["bundle"], box, task["source_dir"], student_id=task["student"],
                             work_dir=task["work_dir"], cell_timeout=task.get("cell_timeout", 600),
                             submission_timeout=task.get("submission_timeout", SUBMISSION_TIMEOUT))
    except BaseException:
        box.close()
        raise
    try:  # a finished result stands even when undoing the sandbox fails (`labkit cleanup` finds the rest)
        box.close()
    except Exception as exc:  # noqa: BLE001
        res["notes"].append(f"the sandbox was not wholly removed: {type(exc).__name__}: {str(exc)[:200]}")
    res["sandbox"], res["seconds"] = task["sandbox"], round(time.perf_counter() - started, 3)
    res["sandbox_info"] = getattr(box, "info", None)
    return res


def grade_class(paths, bundle, host, source_dir, out_dir, sandbox="vm", target=None, hide=(), force=False,
                cell_timeout=600, submission_timeout=SUBMISSION_TIMEOUT, jobs=1, dask=None, dask_job=None,
                on_done=None):
    """Grade every submission under ``paths`` into ``out_dir``, each in a sandbox of its own
    (:class:`labkit.course.sandbox.Sandbox`): ``results/<student>/<notebook>.json`` (kept, so a submission
    whose content and bundle did not change is not run again unless ``force``), the executed notebooks,
    ``gradebook.csv``, ``questions.csv`` (per-question statistics), ``totals.png`` and one
    ``feedback/<student>.html`` each. ``jobs`` submissions run at once on this machine; ``dask`` (a
    scheduler address, or a ``distributed.Client``) sends each one to a Dask cluster instead, as
    ``dask_job(task)`` (a function the workers can import, which makes its own host Lab). ``hide``: more
    paths the kernels must not see (the submissions, the bundle's file and ``out_dir`` always are).
    Returns the gradebook (a pandas DataFrame)."""
    subs = submissions(paths)
    hide = tuple(os.path.abspath(p) for p in tuple(hide) + tuple(paths) + (out_dir, source_dir))
    results, pending = [], []
    for sid, path in subs:
        d = os.path.join(out_dir, "results", _safe(sid))
        os.makedirs(d, exist_ok=True)
        key = _digest(path, bundle)
        stem = _safe(os.path.splitext(os.path.basename(path))[0])
        cached = os.path.join(d, stem + ".json")
        old = None
        if not force and os.path.exists(cached):
            try:
                with open(cached, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
        if isinstance(old, dict) and old.get("key") == key:
            old["cached"] = True
            results.append(old)
            if on_done:
                on_done(old)
            continue
        pending.append(({"student": sid, "path": os.path.abspath(path), "bundle": bundle,
                         "source_dir": os.path.abspath(source_dir), "work_dir": os.path.abspath(os.path.join(d, stem + ".run")),
                         "sandbox": sandbox, "hide": hide, "cell_timeout": cell_timeout,
                         "submission_timeout": submission_timeout}, key, cached))

    def finish(task, key, cached, res):
        res["key"], res["path"] = key, task["path"]
        if not res.get("grader_failed"):  # the grader's own failure is tried again next time
            tmp = cached + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(res, f, indent=1)
            os.replace(tmp, cached)
        res["cached"] = False
        results.append(res)
        if on_done:
            on_done(res)

    def failed(task, exc):  # the grader's own failure on one submission: its row says so, the rest go on
        return {"student": task["student"], "notebook": _named(task["path"], bundle), "questions": [], "notes": [],
                "error": f"the grader could not run it: {type(exc).__name__}: {str(exc)[:300]}", "executed": None,
                "grader_failed": True}

    if dask is not None:
        if sandbox == "target" or dask_job is None:
            raise LabkitError("Dask workers make their own sandboxes: --dask goes with --sandbox vm or container",
                              fix="drop --target, or grade with --jobs N on this machine")
        from dask.distributed import Client, as_completed
        client = dask if isinstance(dask, Client) else Client(dask)
        try:
            futures = {client.submit(dask_job, task, pure=False): (task, key, cached) for task, key, cached in pending}
            for fut in as_completed(futures):
                task, key, cached = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001 - one submission's failure is its row
                    res = failed(task, exc)
                finish(task, key, cached, res)
        finally:
            if client is not dask:
                client.close()
    elif jobs > 1:
        from concurrent.futures import ThreadPoolExecutor, as_completed
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="grade") as pool:
            futures = {pool.submit(grade_submission, task, host, target): (task, key, cached)
                       for task, key, cached in pending}
            for fut in as_completed(futures):
                task, key, cached = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001
                    res = failed(task, exc)
                finish(task, key, cached, res)
    else:
        for task, key, cached in pending:
            try:
                res = grade_submission(task, host, target)
            except Exception as exc:  # noqa: BLE001 - one submission's failure is its row, the class goes on
                res = failed(task, exc)
            finish(task, key, cached, res)
    order = {(sid, os.path.abspath(p)): i for i, (sid, p) in enumerate(subs)}
    results.sort(key=lambda r: order.get((r["student"], os.path.abspath(r.get("path", ""))), 0))
    return write_gradebook(results, bundle, out_dir)


def write_gradebook(results, bundle, out_dir):
    """gradebook.csv (a row per student, a column per question, total), questions.csv, totals.png and the
    feedback pages, from graded notebooks' results."""
    import pandas as pd

    from . import plotting
    points = _question_points(bundle)
    out_of = sum(points.values())
    rows = {}
    for res in results:
        row = rows.setdefault(res["student"], {})
        for q in res["questions"]:
            row[q["question"]] = q["points"]
    book = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=list(points)).fillna(0.0)
    book.index.name = "student"
    book["total"] = book.sum(axis=1)
    os.makedirs(out_dir, exist_ok=True)
    book.to_csv(os.path.join(out_dir, "gradebook.csv"))
    stats = book.drop(columns=["total"]).agg(["mean", "median", "min", "max"]).T
    stats["full"] = [(book[q] >= points[q]).mean() for q in stats.index]
    stats.to_csv(os.path.join(out_dir, "questions.csv"))
    fig = plotting.score_histogram(book["total"], out_of, subtitle=f"{len(book)} students, {out_of:g} points")
    plotting.save(fig, out_dir, "totals")
    fb = os.path.join(out_dir, "feedback")
    os.makedirs(fb, exist_ok=True)
    by_student = {}
    for res in results:
        by_student.setdefault(res["student"], []).append(res)
    for sid, res_list in by_student.items():
        with open(os.path.join(fb, _safe(sid) + ".html"), "w", encoding="utf-8") as f:
            f.write(feedback_html(sid, res_list))
    return book


def _question_points(bundle):
    """{question: points}: every visible question in course order, then the hidden ones."""
    notebooks = bundle["notebooks"].values()
    points = {q["question"]: q["points"] for n in notebooks for c in n["checks"].values() for q in c["questions"]}
    points.update((h["question"], h["points"]) for n in notebooks for h in (n.get("hidden") or {}).get("checks", []))
    return points


def _edition(nb):
    """The language of the edition a submission was made from (its metadata labkit.edition, e.g. 'ko'; 'en'
    otherwise). The student could change it: it chooses only the words of their own feedback page."""
    from .feedback import LANGS
    meta = nb.get("metadata") if isinstance(nb, dict) else None
    mine = meta.get("labkit") if isinstance(meta, dict) else None
    lang = mine.get("edition") if isinstance(mine, dict) else None
    return lang if isinstance(lang, str) and lang in LANGS else "en"


def feedback_html(student, results):
    """One student's feedback: each notebook's questions, points and the checks' messages (a hidden
    check shows its name, result and message, never its code), in the language of the edition the student
    worked in (labkit.course.feedback)."""
    import html
    from .feedback import translate
    parts = [f"<!doctype html><meta charset='utf-8'><title>Feedback for {html.escape(student)}</title>",
             f"<h1>Feedback for {html.escape(student)}</h1>"]
    for res in results:
        got = sum(q["points"] for q in res["questions"])
        out_of = sum(q["max_points"] for q in res["questions"])
        parts.append(f"<h2>{html.escape(res.get('notebook') or os.path.basename(res.get('path', '?')))}: "
                     f"{got:g} / {out_of:g}</h2>")
        if res.get("error"):
            parts.append(f"<p><b>The run stopped:</b> {html.escape(res['error'])}</p>")
        if res.get("notes"):
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in res["notes"]) + "</ul>")
        parts.append("<table><tr><th>question</th><th>points</th><th>feedback</th></tr>")
        for q in res["questions"]:
            name = q["question"] + (" (hidden check)" if q.get("hidden") else "")
            said = translate(str(q["feedback"]), res.get("lang", "en"))
            parts.append(f"<tr><td>{html.escape(name)}</td><td>{q['points']:g} / {q['max_points']:g}</td>"
                         f"<td>{html.escape(said)}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"
