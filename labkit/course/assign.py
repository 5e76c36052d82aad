"""Student editions: the source notebooks carry solutions between markers; students get them blank.

In a source cell, the student's line comes first (e.g. ``box = None  # start a process ...``) and the
solution follows between ``### BEGIN SOLUTION`` and ``### END SOLUTION``; the student edition drops
the solution lines, so a blank notebook still runs to the end and its checks record zero with a reason.
"""
import json
import os

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


def write_student_editions(src_dir, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for fn in sorted(os.listdir(src_dir)):
        if fn.endswith(".ipynb") and fn[:2].isdigit():
            with open(os.path.join(src_dir, fn), encoding="utf-8") as f:
                nb = json.load(f)
            path = os.path.join(out_dir, fn)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(student_edition(nb), f, indent=1, ensure_ascii=False)
                f.write("\n")
            written.append(path)
    return written
