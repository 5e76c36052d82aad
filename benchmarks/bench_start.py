"""Benchmark: container start latency, labkit next to crun and runc, on the same root, in the same run.

Each case starts a container running /bin/true, with PID, mount, UTS, IPC and network namespaces, a
cgroup and an overlay root (one busybox overlay root, mounted once and used by all three as their
bundle's rootfs), and waits for it to exit. The rig and the timing are labkit's start-up experiment
(:func:`labkit.agent.measure.startup_prepare` / ``startup_sample``, timed on the target). The cases are
interleaved, after a warm-up; the figures are min / median / max milliseconds and each median's
ratio to crun's.

crun refuses hybrid cgroup hosts ("cgroups in hybrid mode not supported, drop all controllers from
cgroupv2"); its workaround here: run it in a private mount namespace in which the almost empty cgroup2
mount at /sys/fs/cgroup/unified is unmounted, so crun sees a v1 host. That is reported with the figures.

    sudo .venv/bin/python benchmarks/bench_start.py [--runs 20]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import labkit  # noqa: E402
from _table import print_times  # noqa: E402  (benchmarks/_table.py)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    lab = labkit.connect("local")
    mode = lab.cgroup_mode()["mode"]
    rig = lab.call("bench.startup_prepare")
    try:
        cases = ["labkit"] + sorted(rig["runtimes"])
        times = {k: [] for k in cases}
        for i in range(-3, args.runs):  # three warm-up rounds, then interleaved
            for case in cases:
                s = lab.call("bench.startup_sample", case=case, rig=rig)
                if i >= 0:
                    times[case].append(s["elapsed_s"] * 1000)
    finally:
        lab.call("bench.startup_finish", rig=rig)
    print(f"container start, /bin/true to exit: {args.runs} runs per case, interleaved; {mode} cgroups, "
          f"kernel {os.uname().release}, {os.uname().machine}")
    print_times(times, "crun", "runtime", 10, "crun")
    for n in rig["notes"]:
        print("note:", n)
    return times


if __name__ == "__main__":
    main()
