"""The ``labkit`` command: doctor, cleanup, lab (run the notebooks headless), assign.

Mirrors what a notebook does with ``labkit.connect()``; exits non-zero with the error's fix on failure.
"""
import argparse
import json
import os
import sys

from . import __version__
from .errors import LabkitError

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def _lab(args):
    from . import connect
    return connect(args.target)


def cmd_doctor(args):
    rep = _lab(args).doctor()
    print(json.dumps(rep.lines, indent=1) if args.json else rep.text())
    return 0 if rep["ok"] else 1


def cmd_cleanup(args):
    rec = _lab(args).cleanup(dry_run=args.dry_run)
    items = rec.facts.get("found", []) if args.dry_run else rec.get("removed", [])
    for item in items:
        print(("would remove " if args.dry_run else "removed ") + item)
    left = rec.facts.get("left") or []
    for item in left:
        print("could not remove " + item, file=sys.stderr)
    return 1 if left else 0


def run_notebooks(target, output, notebooks=None, student_id="anonymous", quick=True, timeout=900,
                  source_dir=NOTEBOOK_DIR):
    """Execute notebooks with papermill into ``output``; returns [(name, path, scores)]."""
    import papermill as pm
    from .grading import read_scores
    os.makedirs(output, exist_ok=True)
    names = notebooks or sorted(f for f in os.listdir(source_dir) if f.endswith(".ipynb") and f[:2].isdigit())
    results = []
    for name in names:
        out = os.path.join(output, name)
        pm.execute_notebook(os.path.join(source_dir, name), out, cwd=output, kernel_name="python3",
                            parameters={"target": target, "student_id": student_id, "quick": quick,
                                        "output_dir": os.path.abspath(output)},
                            execution_timeout=timeout, progress_bar=False)
        results.append((name, out, read_scores(out)))
    return results


def cmd_lab(args):
    results = run_notebooks(args.target, args.output, args.notebooks or None, quick=not args.full)
    for name, path, scores in results:
        total = [s for s in scores if s["question"] == "total"]
        t = total[-1] if total else {"points": 0, "max_points": 0}
        print(f"{name}: {t['points']:g}/{t['max_points']:g} points -> {path}")
    print(f"executed notebooks and charts are in {os.path.abspath(args.output)}")
    return 0


def cmd_assign(args):
    from .assign import write_student_editions
    for p in write_student_editions(args.source, args.output):
        print(p)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="labkit", description="Build a Linux container one mechanism at a time.")
    p.add_argument("--version", action="version", version=f"labkit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=os.environ.get("LABKIT_TARGET", "auto"),
                        help="auto, local, sudo or ssh://user@host:port (default: auto)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("doctor", parents=[common], help="what this target can do, each line with its fix")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_doctor)
    c = sub.add_parser("cleanup", parents=[common], help="remove every kernel object labkit made (and nothing else)")
    c.add_argument("--dry-run", action="store_true")
    c.set_defaults(fn=cmd_cleanup)
    lab = sub.add_parser("lab", parents=[common], help="execute the notebooks headless into one output folder")
    lab.add_argument("--output", default="lab-output")
    lab.add_argument("--full", action="store_true", help="full mode instead of quick mode")
    lab.add_argument("notebooks", nargs="*")
    lab.set_defaults(fn=cmd_lab)
    a = sub.add_parser("assign", help="write student editions (solutions removed)")
    a.add_argument("--source", default=NOTEBOOK_DIR)
    a.add_argument("--output", default="student-notebooks")
    a.set_defaults(fn=cmd_assign)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except LabkitError as exc:
        print(f"labkit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
