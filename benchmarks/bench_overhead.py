"""Benchmark: what isolation costs, native vs labkit container vs VM, every figure from one run.

Prints start-up medians (process, unshare, labkit, crun, runc, VM) and, for CPU, memory bandwidth,
syscalls, fork, file I/O and network (throughput and latency), min / median / max and each case's
median time over native's median time from the same run. The VM's accelerator is in every label
(TCG here: KVM guests hang on these machines, and the harness says so).

    sudo .venv/bin/python benchmarks/bench_overhead.py [--full] [--output bench-output]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import labkit  # noqa: E402
from labkit.course import bench  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--output", default=None, help="also write CSV and PNG files here")
    ap.add_argument("--only", default=None)
    args = ap.parse_args(argv)
    experiments = args.only.split(",") if args.only else None
    res = bench.Bench(labkit.connect("local"), "full" if args.full else "quick", experiments=experiments,
                      progress=False).run()
    import pandas as pd
    print(bench.env_line(res.env))
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(res.summary().round(3).to_string(index=False))
        print("\nmedian time / native median time (same run):")
        print(res.ratios().round(3).to_string())
    for note in res.env["notes"]:
        print("note:", note)
    if args.output:
        res.save(args.output)
    return res


if __name__ == "__main__":
    main()
