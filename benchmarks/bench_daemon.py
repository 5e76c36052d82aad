"""Benchmark: what labkit's daemon costs and saves, measured in one run on this machine.

1. `labkit run --rm --network none busybox true` as a whole process from a shell (Python's start-up, the
   request, the container's start and exit, its removal): through labkit's daemon, and in-process
   (``LABKIT_DAEMON=off``, what every labkit command did before the daemon), next to `crun run` on an OCI
   bundle over a busybox root (labkit's start-up rig, :func:`labkit.agent.measure.startup_prepare`).
   Where the time goes, in the same rounds: `python -c pass` (this Python's own start and exit, its site
   packages included: the floor of any Python client), `labkit --version` (the labkit command's floor:
   interpreter, imports, arguments) and the same container made, started, waited for and removed by requests
   to the daemon from this process (the engine's part, no process start). Interleaved after a warm-up, with the
   package's byte code compiled first (as an installed package has it); min / median / max milliseconds and
   each median's ratio to crun's.
2. Memory of labkit's own processes per idle container (PSS from /proc/PID/smaps_rollup: the daemon, its
   fork server and the containers' supervisor, one process for all; the containers' own processes are not
   counted) with 1, 8 and 32 containers running `sleep`: shared out, and what one more container adds.

    sudo .venv/bin/python benchmarks/bench_daemon.py [--runs 15] [--counts 1,8,32]
"""
import argparse
import os
import secrets
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import labkit  # noqa: E402
from labkit.agent import daemon, supervisor  # noqa: E402  (the benchmark runs on the target itself, as root)
from _table import print_times  # noqa: E402  (benchmarks/_table.py)


def _pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return out


def start_times(runs):
    cli = [sys.executable, "-m", "labkit.cli", "run", "--rm", "--network", "none", "busybox", "true"]
    env_off = dict(os.environ, LABKIT_DAEMON="off")
    direct = labkit.connect("local") if daemon.status() is None else None
    if direct is None:
        raise SystemExit("stop labkit's daemon first (labkit daemon stop): this benchmark starts its own")
    rig = direct.call("bench.startup_prepare")
    cases = {"labkit via daemon": (cli, dict(os.environ)), "labkit in-process": (cli, env_off)}
    if "crun" in rig["runtimes"]:
        cases["crun run"] = None
    cases["labkit --version"] = ([sys.executable, "-m", "labkit.cli", "--version"], dict(os.environ))
    cases["python -c pass"] = ([sys.executable, "-c", "pass"], dict(os.environ))
    cases["daemon requests only"] = "requests"
    times = {k: [] for k in cases}
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "labkit")], check=True,
                   stdout=subprocess.DEVNULL)
    st = daemon.start()
    via = None
    try:
        via = labkit.connect("local")
        for i in range(-2, runs):
            for name, how in cases.items():
                t = time.perf_counter()
                if how == "requests":
                    c = via.create("busybox", ["true"], network=None)
                    c.start()
                    via.call("container.wait", ref=c.id, timeout=10)
                    c.rm(force=True)
                else:
                    argv, env = how if how else (rig["runtimes"]["crun"] + [f"lkb-{secrets.token_hex(4)}"], None)
                    res = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
                    if res.returncode != 0:
                        raise SystemExit(f"{name} failed ({res.returncode}): {res.stderr[-400:]}")
                elapsed = (time.perf_counter() - t) * 1000
                if i >= 0:
                    times[name].append(elapsed)
    finally:
        if via is not None:
            via.close()
        daemon.stop()
        direct.call("bench.startup_finish", rig=rig)
        direct.close()
    print(f"whole process from a shell, /bin/true in busybox: {runs} runs per case, interleaved after 2 warm-up "
          f"rounds; daemon pid {st['pid']}; kernel {os.uname().release}, {os.uname().machine}, {os.cpu_count()} CPUs")
    print_times(times, "crun run", "case", 20, "crun")
    for n in rig["notes"]:
        print("note:", n)
    return times


def idle_memory(counts):
    st = daemon.start()
    via = labkit.connect("local")
    made = []
    rows = []
    try:
        for n in counts:
            while len(made) < n:
                c = via.create("busybox", ["sleep", "3600"], name=f"lk-bench-idle-{len(made)}", network=None)
                c.start()
                made.append(c)
            time.sleep(0.5)
            server = _children(st["pid"])  # the daemon's fork server (and anything else it runs)
            d_kib = _pss_kib(st["pid"]) + sum(_pss_kib(p) for p in server)
            s_kib = sum(_pss_kib(p) for p in supervisor.holders(supervisor.identity()))
            rows.append((n, d_kib, s_kib))
    finally:
        for c in made:
            try:
                c.rm(force=True)
            except labkit.LabkitError:
                pass
        via.close()
        daemon.stop()
    print("\nidle memory of labkit's processes (PSS, KiB): the daemon with its fork server, the supervisor;")
    print("shared out over the containers, and what each container added since the row before")
    print(f"{'containers':>10}{'daemon':>10}{'supervisor':>12}{'per container':>15}{'added each':>12}")
    last = None
    for n, d, sv in rows:
        added = f"{(d + sv - last[1] - last[2]) / (n - last[0]):>12.0f}" if last else f"{'':>12}"
        print(f"{n:>10}{d:>10}{sv:>12}{(d + sv) / n:>15.0f}{added}")
        last = (n, d, sv)
    print("goal (issue 15): at most 1536 KiB per container")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--counts", default="1,8,32")
    args = ap.parse_args(argv)
    start_times(args.runs)
    idle_memory([int(x) for x in args.counts.split(",")])


if __name__ == "__main__":
    main()
