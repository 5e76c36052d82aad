"""Grading throughput: one class of labs 00-02, graded with --jobs 1, --jobs 2 and a local Dask cluster, VM and container sandbox.

Every mode grades the same submissions (solutions of labs 00, 01 and 02, in turn) from scratch, each in a
sandbox of its own, for both sandboxes: the VM (a qemu guest restored from the saved boot, TCG where KVM
is not usable, and labelled) and the container (a fresh agent in namespaces of its own); the kernel runs
as a user of its own in both. Prints, per sandbox and mode: submissions per minute over the whole class
(wall clock, from the first submission started to the gradebook written), min/median/max seconds per
submission, and the ratio against --jobs 1 of the same sandbox measured in this same run. The points
every mode gave must agree.

    sudo .venv/bin/python benchmarks/bench_grade.py [--class-size 12] [--sandbox vm|container]
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
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask rows (distributed not installed)")
    ap.add_argument("--sandbox", action="append", choices=["vm", "container"],
                    help="the sandboxes to measure (default: both)")
    args = ap.parse_args()
    import labkit
    from labkit.agent import vmsandbox
    host = labkit.connect("local")
    sandboxes = args.sandbox or ["container", "vm"]
    snap = vmsandbox.snapshot() if "vm" in sandboxes else None  # made (or found) before the clock starts
    work = tempfile.mkdtemp(prefix="labkit-bench-grade-", dir="/srv" if os.path.isdir("/srv") else None)
    os.chmod(work, 0o755)
    rows, totals = {}, {}
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
        try:
            for sandbox in sandboxes:
                for label, kw in modes:
                    out = os.path.join(work, sandbox + "-" + label.replace(" ", "_").replace(",", ""))
                    wall, per, totals[(sandbox, label)] = grade(paths, out, host, sandbox=sandbox, **kw)
                    rows.setdefault(sandbox, []).append((label, wall, per))
        finally:
            if client is not None:
                client.close()
                cluster.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"grading {args.class_size} submissions of labs {', '.join(LABS)} (solutions), {os.cpu_count()} CPUs")
    for sandbox in sandboxes:
        if sandbox == "vm":
            print(f"vm sandbox: a guest restored per submission ({snap['accel'].upper()}: {snap['accel_reason']}); "
                  f"its one boot, paid once per machine and not in the rows: {snap['boot_s']:.1f} s to ready + "
                  f"{snap['save_s']:.1f} s to save, {snap['bytes'] >> 20} MiB")
        else:
            print("container sandbox: a fresh agent in namespaces and a cgroup of its own per submission")
        print(f"{'mode':<18}{'subs/min':>10}{'wall s':>9}{'min s':>8}{'median s':>10}{'max s':>8}{'vs jobs 1':>11}")
        base = rows[sandbox][0][1]
        for label, wall, per in rows[sandbox]:
            print(f"{label:<18}{60 * args.class_size / wall:>10.1f}{wall:>9.1f}{min(per):>8.1f}"
                  f"{statistics.median(per):>10.1f}{max(per):>8.1f}{base / wall:>10.2f}x")
    if len(sandboxes) == 2:
        c, v = (rows[s][0][1] for s in ("container", "vm"))
        print(f"vm vs container, --jobs 1: {c / v:.2f}x the container's throughput")
    first = next(iter(totals.values()))
    agree = all(t == first for t in totals.values())
    print("every mode gave the same points: " + ("yes" if agree else f"NO: {totals}"))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
