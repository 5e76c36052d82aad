"""Benchmark: the layer cache of `lab.build`.

Builds a 5-layer recipe (FROM + 5 lines that each make a layer) in three cases, interleaved, several
times each, on the target:
  cold         every line rebuilt (no_cache=True)
  no change    every line from the cache
  line 4       the 4th line changed: it and the lines after it are rebuilt, lines 1-3 come from the cache
and prints min / median / max seconds per case and the median's ratio to cold, measured in this run.

    sudo .venv/bin/python benchmarks/bench_build_cache.py [--runs 5] [--target local]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import labkit  # noqa: E402

RECIPE = """FROM busybox
RUN dd if=/dev/urandom of=/data1 bs=1M count=4 2>/dev/null   # {salt}
RUN dd if=/dev/urandom of=/data2 bs=1M count=4 2>/dev/null
RUN mkdir -p /app && echo build {line4} > /app/version
COPY app.sh /app/app.sh
RUN sh -c 'for i in $(seq 200); do echo $i; done > /app/numbers'
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--target", default="local")
    args = ap.parse_args(argv)
    lab = labkit.connect(args.target)
    salt = os.urandom(6).hex()  # this run's recipe is new to the cache
    ctx = {"app.sh": "echo hello\n"}
    tag = "bench-cache:latest"
    times = {"cold": [], "no change": [], "line 4 changed": []}
    rebuilt, keys = {}, set()
    try:
        warm = lab.build(RECIPE.format(salt=salt, line4=0), tag, context=ctx)  # warm-up: fills the cache once
        keys.update(s["key"] for s in warm["steps"][1:])
        for i in range(1, args.runs + 1):
            for case in times:  # interleaved, so drift on a shared machine hits every case alike
                if case == "cold":
                    rec = lab.build(RECIPE.format(salt=salt, line4=0), tag, context=ctx, no_cache=True)
                elif case == "no change":
                    rec = lab.build(RECIPE.format(salt=salt, line4=0), tag, context=ctx)
                else:
                    rec = lab.build(RECIPE.format(salt=salt, line4=i), tag, context=ctx)
                times[case].append(rec["seconds"])
                rebuilt[case] = rec["rebuilt"]
                keys.update(s["key"] for s in rec["steps"][1:])
    finally:
        lab.rmi(tag)
        lab.prune(cache_keys=keys)  # this run's cache entries and layers go; FROM's entry is shared
    cold = statistics.median(times["cold"])
    print(f"layer cache: 5-layer recipe, {args.runs} runs per case, target {lab.target} "
          f"({lab.info.get('machine')}, python {lab.info.get('python')})")
    print(f"{'case':<16}{'min s':>9}{'median s':>10}{'max s':>9}{'vs cold':>9}  steps rebuilt")
    for case, xs in times.items():
        med = statistics.median(xs)
        print(f"{case:<16}{min(xs):>9.3f}{med:>10.3f}{max(xs):>9.3f}{med / cold:>9.2f}  {rebuilt[case]}")
    return times


if __name__ == "__main__":
    main()
