"""Grading throughput: one class of labs 00-02, graded with --jobs 1, --jobs 2 and a local Dask cluster.

Every mode grades the same submissions (solutions of labs 00, 01 and 02, in turn) from scratch, each in a
sandbox of its own (the container sandbox: a fresh agent in namespaces of its own, and the kernel as a
user of its own). Prints, per mode: submissions per minute over the whole class (wall clock, from the
first submission started to the gradebook written) and min/median/max seconds per submission, and the
ratio of each mode against --jobs 1 measured in this same run. The points each mode gave must agree.

    sudo .venv/bin/python benchmarks/bench_grade.py [--class-size 12]
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

LABS = ("00-setup", "01-chroot", "02-namespaces")


def make_class(d, size):
    from labkit.course.runbook import NOTEBOOK_DIR
    os.makedirs(d)
    for i in range(size):
        name = LABS[i % len(LABS)]
        shutil.copy(os.path.join(NOTEBOOK_DIR, name + ".ipynb"), os.path.join(d, f"s{i:02d}-{name}.ipynb"))
    return sorted(os.path.join(d, f) for f in os.listdir(d))


def grade(paths, out, host, **kw):
    from labkit.cli import grade_job
    from labkit.course.assign import grading_bundle
    from labkit.course.grade import grade_class
    from labkit.course.runbook import NOTEBOOK_DIR
    bundle = grading_bundle(NOTEBOOK_DIR)
    times, started = {}, time.perf_counter()

    def done(res):
        times[res["student"]] = time.perf_counter()
    book = grade_class(paths, bundle, host, NOTEBOOK_DIR, out, force=True, dask_job=grade_job, on_done=done, **kw)
    wall = time.perf_counter() - started
    per = []
    for d in sorted(os.listdir(os.path.join(out, "results"))):
        for fn in os.listdir(os.path.join(out, "results", d)):
            if fn.endswith(".json"):
                per.append(json.load(open(os.path.join(out, "results", d, fn))).get("seconds"))
    return wall, [p for p in per if p is not None], book["total"].to_dict()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--class-size", type=int, default=12)
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask row (distributed not installed)")
    args = ap.parse_args()
    import labkit
    host = labkit.connect("local")
    work = tempfile.mkdtemp(prefix="labkit-bench-grade-", dir="/srv" if os.path.isdir("/srv") else None)
    os.chmod(work, 0o755)
    try:
        paths = make_class(os.path.join(work, "class"), args.class_size)
        modes = [("--jobs 1", {"jobs": 1}), ("--jobs 2", {"jobs": 2})]
        cluster = client = None
        if not args.no_dask:
            from dask.distributed import Client, LocalCluster
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=0,
                                   dashboard_address=None)
            client = Client(cluster)
            modes.append(("dask, 2 workers", {"dask": client}))
        rows, totals = [], {}
        try:
            for label, kw in modes:
                wall, per, totals[label] = grade(paths, os.path.join(work, label.replace(" ", "_").replace(",", "")), host,
                                                 **kw)
                rows.append((label, wall, per))
        finally:
            if client is not None:
                client.close()
                cluster.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"grading {args.class_size} submissions of labs {', '.join(LABS)} (solutions), container sandbox, "
          f"{os.cpu_count()} CPUs")
    print(f"{'mode':<18}{'subs/min':>10}{'wall s':>9}{'min s':>8}{'median s':>10}{'max s':>8}{'vs jobs 1':>11}")
    base = rows[0][1]
    for label, wall, per in rows:
        print(f"{label:<18}{60 * args.class_size / wall:>10.1f}{wall:>9.1f}{min(per):>8.1f}{statistics.median(per):>10.1f}"
              f"{max(per):>8.1f}{base / wall:>10.2f}x")
    print("vm sandbox: not measured - the throw-away VM sandbox is not built yet (README: grading)")
    first = next(iter(totals.values()))
    agree = all(t == first for t in totals.values())
    print("every mode gave the same points: " + ("yes" if agree else f"NO: {totals}"))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
