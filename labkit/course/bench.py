"""The overhead harness: what isolation costs, native vs container vs VM, measured in one run.

:class:`Bench` plans the measurements (quick or full), warms up, repeats, and interleaves the cases
(the order rotates every repeat, so no case always runs first or on a warmer cache); every sample is
taken on the target by :mod:`labkit.agent.measure` and kept raw in a pandas DataFrame. :class:`BenchResult`
summarises (min / median / max, each case's median time over native's median time, from the same run),
records the environment (kernel, CPU, cgroup mode, how the VM was accelerated), draws the charts
(:mod:`labkit.course.plotting`) and writes CSV and PNG files. What runs where:

========== =================================================================================
start-up   process, ``unshare``, labkit, crun and runc where installed, and the VM (boot to /init)
cpu        busybox awk arithmetic loop                         (pure user-space CPU)
memory     dd /dev/zero -> /dev/null in 16 MiB blocks           (kernel memory bandwidth)
syscalls   dd with 1-byte blocks: two syscalls per byte          (syscall entry and exit)
fork       fork+exec of /bin/true                              (process creation)
fileio     dd 1 MiB blocks to a file, then fsync              (host disk / overlay / VM disk)
network    a host client to an nc listener: loopback, container over veth+bridge and over NAT,
           VM over virtio-net on a tap on the same bridge       (throughput and round-trip latency)
density    N idle containers vs N idle VMs: PSS per instance (a container's processes plus its share of
           labkit's supervisor; a VM's qemu) and the host's MemAvailable drop
========== =================================================================================
"""
import json
import os
import secrets
import sys
import time

from ..wire.errors import Conflict

PLANS = {
    "quick": {"repeats": 3, "max_repeats": 8, "warmup": 1, "startup_runs": 5, "vm_boots": 2, "density": (1, 2, 4),
              "amounts": {"cpu": 300_000, "memory": 512, "syscalls": 50_000, "fork": 30, "fileio": 32},
              "net": {"throughput": 32, "latency": 300}, "vm_memory_mb": 512},
    "full": {"repeats": 10, "max_repeats": 20, "warmup": 2, "startup_runs": 20, "vm_boots": 5, "density": (1, 2, 4, 8),
             "amounts": {"cpu": 3_000_000, "memory": 4096, "syscalls": 500_000, "fork": 300, "fileio": 256},
             "net": {"throughput": 256, "latency": 3000}, "vm_memory_mb": 512},
}
WORKLOADS = ("cpu", "memory", "syscalls", "fork", "fileio")
EXPERIMENTS = ("startup",) + WORKLOADS + ("net-throughput", "net-latency", "density")
CASES = ("native", "container", "vm")
BENCH_NET = ("bench", "10.213.77.0/24")
RATE_UNITS = {"cpu": "Mloops/s", "memory": "MiB/s", "syscalls": "Msyscalls/s", "fork": "processes/s",
              "fileio": "MiB/s", "net-throughput": "MiB/s", "net-latency": "µs per round trip",
              "startup": "ms", "density": "MiB per instance"}


def _random_port():
    """A port for a listener on the host: random, and below Linux's ephemeral range (32768 on), which the
    host's own connections draw their local ports from."""
    return 20000 + secrets.randbelow(12000)


class Progress:
    """A text progress bar on stderr (redrawn in place on a terminal, a line per tenth otherwise)."""

    def __init__(self, total, enabled=True, stream=None):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_tenth = -1

    def step(self, what):
        self.done += 1
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
        line = f"[{bar}] {self.done}/{self.total} {what}"
        if self.tty:
            self.stream.write("\r" + line[:100].ljust(100) + ("\n" if self.done >= self.total else ""))
            self.stream.flush()
        elif int(frac * 10) != self._last_tenth:
            self._last_tenth = int(frac * 10)
            self.stream.write(line + "\n")
            self.stream.flush()


#: a workload's ratio is told apart from 1.0 once its 95% interval leaves 1.0, or lies within 1.0 ± TELL_BAND
#: ("no measurable difference"); a case needs MIN_TO_TELL samples before either (three medians are not enough)
TELL_BAND = 0.05
MIN_TO_TELL = 5


def ratio_interval(times, ref_times, rounds=2000, seed=7):
    """(ratio, low, high): the median of ``times`` over the median of ``ref_times`` (two cases of one run), with a
    95% percentile-bootstrap interval (each side resampled on its own; a fixed seed, so one run's table is
    reproducible)."""
    import numpy as np
    a, b = np.asarray(times, float), np.asarray(ref_times, float)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(a, (rounds, len(a))), axis=1) / np.median(rng.choice(b, (rounds, len(b))), axis=1)
    return float(np.median(a) / np.median(b)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def verdict(ratio, low, high, n=MIN_TO_TELL):
    """What a ratio and its interval allow one to say."""
    if n < MIN_TO_TELL:
        return f"too few samples ({n}) to tell"
    if low > 1:
        return f"{ratio:.2f}x native: slower"
    if high < 1:
        return f"{ratio:.2f}x native: faster"
    if low >= 1 - TELL_BAND and high <= 1 + TELL_BAND:
        return "no measurable difference"
    return f"no measurable difference, but too noisy to see one: {low:.2f}-{high:.2f}"


def undecided(v):
    """True for a verdict that more samples could still change (too few, or an interval too wide to tell)."""
    return v.startswith("too few") or "too noisy" in v


class Bench:
    """One run of the harness on ``lab``'s target. ``mode``: 'quick' (minutes, even under TCG) or 'full'."""

    def __init__(self, lab, mode="quick", experiments=None, cases=CASES, accel=None, progress=True, repeats=None):
        from ..wire.errors import InvalidSpec
        if mode not in PLANS:
            raise InvalidSpec(f"bench mode {mode!r}", fix="'quick' or 'full'")
        self.lab, self.mode, self.plan = lab, mode, dict(PLANS[mode])
        if repeats is not None:
            if not isinstance(repeats, int) or repeats < 1:
                raise InvalidSpec(f"repeats={repeats!r} must be a positive whole number", fix="e.g. repeats=5")
            self.plan["repeats"] = self.plan["max_repeats"] = repeats  # exactly these: no rounds added
        self.experiments = tuple(experiments or EXPERIMENTS)
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad:
            raise InvalidSpec(f"unknown experiment(s) {', '.join(bad)}", fix="choose from " + ", ".join(EXPERIMENTS))
        self.cases = tuple(cases)
        bad = [c for c in self.cases if c not in CASES]
        if bad or "native" not in self.cases:
            raise InvalidSpec(f"cases {self.cases!r}: every run needs 'native' (the reference) and knows only "
                              + ", ".join(CASES), fix="e.g. cases=('native', 'container')")
        self.accel, self.progress_enabled = accel, progress
        self.samples, self.notes = [], []

    # -- the plan ------------------------------------------------------------------------------------
    def _count(self):
        p, n = self.plan, 0
        reps = p["warmup"] + p["repeats"]
        per_case = len(self.cases) + ("container" in self.cases)  # NAT is a second container path
        for e in self.experiments:
            if e == "startup":
                n += p["startup_runs"] * 5 + (p["vm_boots"] if "vm" in self.cases else 0)
            elif e in WORKLOADS:
                n += reps * len(self.cases)
            elif e.startswith("net-"):
                n += (p["warmup"] + self._net_repeats()) * per_case
            elif e == "density":
                n += len(p["density"]) * (len(self.cases) - 1)
        return n + 1

    def _add(self, experiment, case, repeat, sample, **extra):
        row = {"experiment": experiment, "case": case, "repeat": repeat, "elapsed_s": sample["elapsed_s"],
               "amount": sample.get("amount"), "unit": sample.get("unit")}
        row.update(extra)
        if repeat >= 0:
            self.samples.append(row)
        return row

    def run(self):
        """Measure everything planned; returns a :class:`BenchResult` (raw samples, summary, charts)."""
        lab = self.lab
        # A target that cannot boot the VM (no kernel in /boot, no qemu) is still measured: without the VM
        # case, and the result says why (env['vm_missing'], a note, the VM columns of the tables).
        vm_missing = lab.vm_missing() if "vm" in self.cases else None
        if vm_missing:
            self.cases = tuple(c for c in self.cases if c != "vm")
        self.bar = Progress(self._count(), self.progress_enabled)
        env = lab.call("bench.environment")
        self.bar.step("environment")
        self.vm_accel = self.accel or env["vm_accel"]
        started = time.time()
        net_made, box, vm = False, None, None
        needs_instances = any(e in WORKLOADS or e.startswith("net-") for e in self.experiments)
        try:
            if "startup" in self.experiments:
                self._startup()
            if needs_instances:
                needs_net = any(e.startswith("net-") for e in self.experiments)
                if needs_net and BENCH_NET[0] not in [n["spec"]["name"] for n in lab.networks()]:
                    lab.network(*BENCH_NET)
                    net_made = True
                if "container" in self.cases:
                    self.nat_port = _random_port()
                    box = lab.run_container("busybox", ["sleep", "1000000"], name=f"lkbench-{secrets.token_hex(3)}",
                                            network=BENCH_NET[0] if needs_net else None,
                                            ports=[f"127.0.0.1:{self.nat_port}:5201"] if needs_net else ())
                    self.box_ip = box.inspect()["NetworkSettings"]["IPAddress"] if needs_net else None
                if "vm" in self.cases:
                    disk = self.plan["amounts"]["fileio"] * 2 + 64 if "fileio" in self.experiments else 0
                    vm = lab.vm_start(memory_mb=self.plan["vm_memory_mb"], accel=self.accel,
                                      network=BENCH_NET[0] if needs_net else None, disk_mb=disk)
                for e in self.experiments:
                    if e in WORKLOADS:
                        self._workload(e, box, vm)
                    elif e.startswith("net-"):
                        self._network(e.split("-", 1)[1], box, vm)
        finally:
            if vm is not None:
                vm.stop()
            if box is not None:
                box.rm(force=True)
            if net_made:
                lab.call("net.remove", name=BENCH_NET[0])
        if "density" in self.experiments:
            self._density()
        env["mode"], env["duration_s"], env["cases"] = self.mode, time.time() - started, list(self.cases)
        env["vm_accel_used"] = self.vm_accel
        env["notes"] = list(getattr(self, "startup_notes", [])) + self.notes
        if vm_missing:
            env["vm_missing"] = vm_missing
            env["notes"].append("no VM was measured: " + vm_missing)
        if self.vm_accel == "tcg" and "vm" in self.cases:
            env["notes"].append("the VM ran under TCG (qemu translating every guest instruction), not KVM: "
                                + env.get("vm_accel_reason", "") + "; its CPU-bound figures measure emulation, "
                                "not virtualisation overhead")
        return BenchResult(self.samples, env, self.plan)

    def _order(self, cases, r):
        k = r % len(cases)
        return cases[k:] + cases[:k]

    def _startup(self):
        lab, p = self.lab, self.plan
        rig = lab.call("bench.startup_prepare")
        try:
            cases = ["process", "unshare", "labkit"] + sorted(rig["runtimes"])
            for r in range(-1, p["startup_runs"]):
                for case in self._order(cases, r):
                    s = lab.call("bench.startup_sample", case=case, rig=rig)
                    self._add("startup", case, r, dict(s, amount=1, unit="start"))
                    if r >= 0:
                        self.bar.step(f"start-up {case}")
            if "vm" in self.cases:
                for r in range(p["vm_boots"]):
                    s = lab.call("bench.startup_sample", case="vm", rig=rig, accel_mode=self.accel)
                    self._add("startup", "vm", r, dict(s, amount=1, unit="start"), accel=s.get("accel"),
                              to_up_s=s.get("to_up_s"))
                    self.bar.step("start-up vm")
            self.startup_notes = rig["notes"]
        finally:
            lab.call("bench.startup_finish", rig=rig)

    def _workload(self, name, box, vm):
        """The planned rounds; then, while a case cannot yet be told apart from native (:func:`verdict`), more
        rounds of that case interleaved with native, up to the plan's ``max_repeats`` (as pyperf warns of an
        unstable benchmark, a case still undecided then says so in the notes)."""
        lab, p = self.lab, self.plan
        amount = p["amounts"][name]

        def one_round(r, cases):
            for case in self._order(cases, r):
                if case == "native":
                    s = lab.call("bench.native", workload=name, amount=amount)
                elif case == "container":
                    s = lab.call("bench.container", ref=box.id, workload=name, amount=amount)
                else:
                    s = lab.call("bench.vm", vm_id=vm.id, workload=name, amount=amount)
                self._add(name, case, r, s, accel=self.vm_accel if case == "vm" else None)
                if r < p["repeats"]:
                    self.bar.step(f"{name} {case}")

        for r in range(-p["warmup"], p["repeats"]):
            one_round(r, list(self.cases))
        r = p["repeats"]
        while True:
            open_cases = [c for c, v in self._verdicts(name).items() if undecided(v)]
            if not open_cases or r >= max(p["max_repeats"], p["repeats"]):
                break
            one_round(r, ["native"] + open_cases)
            r += 1
        for case, v in self._verdicts(name).items():
            if undecided(v):
                self.notes.append(f"{name}, {case}: {v} after {r} rounds (full mode measures more)")

    def _verdicts(self, name):
        """{case: verdict} of one workload from the samples so far."""
        rows = [x for x in self.samples if x["experiment"] == name]
        ref = [x["elapsed_s"] for x in rows if x["case"] == "native"]
        out = {}
        for case in self.cases:
            own = [x["elapsed_s"] for x in rows if x["case"] == case]
            if case != "native" and own and ref:
                out[case] = verdict(*ratio_interval(own, ref), n=min(len(own), len(ref)))
        return out

    def _net_repeats(self):
        """Enough rounds for a verdict (:data:`MIN_TO_TELL`), unless the plan was given its exact number."""
        return max(self.plan["repeats"], min(MIN_TO_TELL, self.plan["max_repeats"]))

    def _network(self, mode, box, vm):
        lab, p = self.lab, self.plan
        amount = p["net"][mode]
        paths = [("native", "native", "127.0.0.1", None)]
        if "container" in self.cases:
            paths += [("container", "container (bridge)", self.box_ip, None),
                      ("container", "container (NAT)", "127.0.0.1", self.nat_port)]
        if "vm" in self.cases:
            paths.append(("vm", "vm", vm.ip, None))
        for r in range(-p["warmup"], self._net_repeats()):
            for where, label, ip, fixed_port in self._order(paths, r):
                port = self._serve(where, mode, fixed_port, box, vm)
                s = lab.call("bench.net_measure", ip=ip, port=fixed_port or port, mode=mode, amount=amount)
                self._add(f"net-{mode}", label, r, s, rtt_median_s=s.get("rtt_median_s"),
                          accel=self.vm_accel if where == "vm" else None)
                self.bar.step(f"net {mode} {label}")

    def _serve(self, where, mode, fixed_port, box, vm):
        """Start the case's listener and return its port: the container's published one, or a random one,
        tried again elsewhere if something on the host holds it."""
        for attempt in range(5):
            port = 5201 if fixed_port else _random_port()
            try:
                self.lab.call("bench.net_serve", case=where, mode=mode, port=port, ref=box.id if box else None,
                              vm_id=vm.id if vm else None)
                return port
            except Conflict:
                if fixed_port or attempt == 4:
                    raise

    def _density(self):
        lab = self.lab
        for n in self.plan["density"]:
            for case in [c for c in self.cases if c != "native"]:
                before = lab.call("bench.mem_available")
                handles = []
                try:
                    for i in range(n):
                        if case == "container":
                            handles.append(lab.run_container("busybox", ["sleep", "1000000"], network=None,
                                                             name=f"lkdense-{secrets.token_hex(3)}"))
                        else:
                            handles.append(lab.vm_start(memory_mb=256, accel=self.accel))
                    time.sleep(1.0)  # let them settle into idle
                    after = lab.call("bench.mem_available")
                    for h in handles:
                        if case == "container":
                            fp = lab.call("bench.container_footprint", ref=h.id)
                        else:
                            fp = lab.call("bench.vm_footprint", vm_id=h.id)
                        self.samples.append({"experiment": "density", "case": case, "repeat": 0, "instances": n,
                                             "elapsed_s": None, "amount": n, "unit": "instances",
                                             "pss_kb": fp["pss_kb"], "supervisor_share_kb": fp.get("supervisor_share_kb"),
                                             "processes_pss_kb": fp.get("processes_pss_kb"),
                                             "mem_available_drop_kb": (before - after) / n,
                                             "accel": self.vm_accel if case == "vm" else None})
                finally:
                    for h in handles:
                        if case == "container":
                            h.rm(force=True)
                        else:
                            h.stop()
                self.bar.step(f"density {case} x{n}")


class BenchResult:
    """Raw samples (``.samples``, a DataFrame), ``.summary()``, ``.env``, ``.charts()``, ``.save(dir)``."""

    def __init__(self, samples, env, plan):
        import pandas as pd
        self.samples = pd.DataFrame(samples)
        self.env, self.plan = env, plan

    @classmethod
    def from_journal(cls, journal):
        """The results the agent really measured, rebuilt from a journal of its answers (the grader's relay:
        method, params, ok, result, in order), one per run of the harness (each starts with
        ``bench.environment``): start-up, the workloads and density, with the warm-up rounds left out as
        :meth:`Bench.run` leaves them. Numbers computed in a student's kernel cannot be trusted; these can."""
        runs, cur = [], None
        for e in journal:
            if not isinstance(e, dict) or not e.get("ok"):
                continue
            if e.get("method") == "bench.environment":
                cur = []
                runs.append((e.get("result") or {}, cur))
            elif cur is not None and str(e.get("method", "")).startswith("bench."):
                cur.append(e)
        return [cls._rebuilt(env, entries) for env, entries in runs]

    @classmethod
    def _rebuilt(cls, env, entries):
        # the mode (and so the warm-up rounds) by the amounts the workloads were asked to do
        asked = [(e["params"].get("workload"), e["params"].get("amount")) for e in entries
                 if e["method"] in ("bench.native", "bench.container", "bench.vm")]
        plan = next((p for p in PLANS.values() if asked and all(p["amounts"].get(w) == a for w, a in asked)),
                    PLANS["quick"])
        samples, seen = [], {}
        vm_used = None
        before = after = None
        footprints = []

        def density_round():
            for case, fp in footprints:
                samples.append({"experiment": "density", "case": case, "repeat": 0, "instances": len(footprints),
                                "elapsed_s": None, "amount": len(footprints), "unit": "instances",
                                "pss_kb": fp.get("pss_kb"), "supervisor_share_kb": fp.get("supervisor_share_kb"),
                                "processes_pss_kb": fp.get("processes_pss_kb"),
                                "mem_available_drop_kb": (before - after) / len(footprints)
                                if isinstance(before, (int, float)) and isinstance(after, (int, float)) else None})
            footprints.clear()

        for e in entries:
            method, params, res = e["method"], e.get("params") or {}, e.get("result")
            if not isinstance(res, dict) and method != "bench.mem_available":
                continue
            if method == "bench.startup_sample":
                case = str(params.get("case"))
                n = seen[("startup", case)] = seen.get(("startup", case), -1) + 1
                repeat = n if case == "vm" else n - 1  # every case but the VM has one warm-up round
                if repeat >= 0:
                    samples.append({"experiment": "startup", "case": case, "repeat": repeat,
                                    "elapsed_s": res.get("elapsed_s"), "amount": 1, "unit": "start",
                                    "accel": res.get("accel"), "to_up_s": res.get("to_up_s")})
                if case == "vm":
                    vm_used = res.get("accel") or vm_used
            elif method in ("bench.native", "bench.container", "bench.vm"):
                case, workload = method.split(".", 1)[1], str(params.get("workload"))
                n = seen[(workload, case)] = seen.get((workload, case), -1) + 1
                if n >= plan["warmup"]:
                    samples.append({"experiment": workload, "case": case, "repeat": n - plan["warmup"],
                                    "elapsed_s": res.get("elapsed_s"), "amount": res.get("amount"),
                                    "unit": res.get("unit")})
            elif method == "bench.mem_available":
                if footprints:
                    density_round()
                    before, after = res, None
                elif before is None or after is not None:
                    before, after = res, None
                else:
                    after = res
            elif method in ("bench.container_footprint", "bench.vm_footprint"):
                footprints.append(("container" if method == "bench.container_footprint" else "vm", res))
        if footprints:
            density_round()
        env = dict(env, vm_accel_used=vm_used or env.get("vm_accel"), rebuilt_from="the agent's journal")
        if not any(x["case"] == "vm" for x in samples):
            env["vm_missing"] = "no VM was measured"
        return cls(samples, env, plan)

    def accel_label(self):
        """The VM's column everywhere: 'VM (KVM)' or 'VM (TCG)'; 'VM (not measured)' when the target had none."""
        if self.env.get("vm_missing"):
            return "VM (not measured)"
        a = (self.env.get("vm_accel_used") or "?").upper()
        return f"VM ({a})"

    def summary(self):
        """One row per experiment and case: min / median / max of the natural figure, and the median
        time of the case over native's median time measured in the same run (1.00 = no overhead; for
        start-up, native is a plain process)."""
        import pandas as pd
        df = self.samples
        rows = []
        if df.empty:
            return pd.DataFrame()
        timed = df[df["experiment"] != "density"].copy()
        for (exp, case), g in timed.groupby(["experiment", "case"], sort=False):
            if exp == "startup":
                vals = g["elapsed_s"] * 1000
            elif exp == "net-latency":
                vals = g["rtt_median_s"] * 1e6
            else:
                vals = g["amount"] / g["elapsed_s"]
                if exp in ("cpu", "syscalls"):
                    vals = vals / 1e6
            ref_case = "process" if exp == "startup" else "native"
            ref = timed[(timed["experiment"] == exp) & (timed["case"] == ref_case)]
            ref_t = (ref["rtt_median_s"] if exp == "net-latency" else ref["elapsed_s"]).median()
            own_t = (g["rtt_median_s"] if exp == "net-latency" else g["elapsed_s"]).median()
            rows.append({"experiment": exp, "case": self._label(case), "n": len(g), "unit": RATE_UNITS[exp],
                         "min": vals.min(), "median": vals.median(), "max": vals.max(),
                         "time vs " + "native": own_t / ref_t if ref_t else None})
        dens = df[df["experiment"] == "density"]
        for (case, n), g in (dens.groupby(["case", "instances"], sort=False) if not dens.empty else ()):
            vals = g["pss_kb"] / 1024
            rows.append({"experiment": f"density x{int(n)}", "case": self._label(case), "n": len(g),
                         "unit": RATE_UNITS["density"], "min": vals.min(), "median": vals.median(), "max": vals.max(),
                         "time vs native": None})
        return pd.DataFrame(rows)

    def _label(self, case):
        return self.accel_label() if case == "vm" else case

    def medians(self, experiment, summary=None):
        """(label, {case: median}) of one experiment's summary rows; for 'density', the rows at the
        largest number of instances measured (label e.g. 'density x4'; None when there are none)."""
        import pandas as pd
        s = self.summary() if summary is None else summary
        if experiment == "density":
            d = s[s["experiment"].str.startswith("density")]
            if d.empty:
                return None, pd.Series(dtype=float)
            experiment = d["experiment"].iloc[-1]
        return experiment, s[s["experiment"] == experiment].set_index("case")["median"]

    def intervals(self):
        """One row per experiment (start-up and density aside) and case: n, the ratio of its median time to
        native's (``time vs native`` of :meth:`summary`), a 95% bootstrap interval (``low``, ``high``) and what
        they allow one to say (``verdict``: slower, faster, no measurable difference, or too few or too noisy to tell)."""
        import pandas as pd
        df = self.samples
        rows = []
        if df.empty:
            return pd.DataFrame(columns=["experiment", "case", "n", "ratio", "low", "high", "verdict"])
        timed = df[~df["experiment"].isin(["startup", "density"])]
        for (exp, case), g in timed.groupby(["experiment", "case"], sort=False):
            if case == "native":
                continue
            col = "rtt_median_s" if exp == "net-latency" else "elapsed_s"
            ref = timed[(timed["experiment"] == exp) & (timed["case"] == "native")][col].dropna()
            own = g[col].dropna()
            if own.empty or ref.empty:
                continue
            ratio, low, high = ratio_interval(own.values, ref.values)
            rows.append({"experiment": exp, "case": self._label(case), "n": min(len(own), len(ref)), "ratio": ratio,
                         "low": low, "high": high, "verdict": verdict(ratio, low, high, min(len(own), len(ref)))})
        return pd.DataFrame(rows)

    def ratios(self):
        """container/native and VM/native time ratios per experiment (medians of the same run)."""
        s = self.summary()
        s = s[~s["experiment"].str.startswith("density") & (s["experiment"] != "startup")]
        return s.pivot_table(index="experiment", columns="case", values="time vs native", sort=False)

    def charts(self):
        """{name: matplotlib figure} for every experiment measured."""
        from . import plotting
        figs = {}
        s = self.summary()
        sub = env_line(self.env)
        if (s["experiment"] == "startup").any():
            figs["startup"] = plotting.startup_chart(s[s["experiment"] == "startup"], subtitle=sub)
        r = self.ratios()
        if not r.empty:
            figs["overhead"] = plotting.overhead_chart(r, subtitle=sub, intervals=self.intervals())
        d = self.samples[self.samples["experiment"] == "density"] if not self.samples.empty else None
        if d is not None and not d.empty:
            figs["density"] = plotting.density_chart(d, vm_label=self.accel_label(), subtitle=sub)
        return figs

    def save(self, output_dir):
        """Write samples.csv, summary.csv, environment.json and a PNG per chart; returns the paths."""
        from . import plotting
        os.makedirs(output_dir, exist_ok=True)
        paths = []
        for name, frame in (("bench-samples.csv", self.samples), ("bench-summary.csv", self.summary())):
            path = os.path.join(output_dir, name)
            frame.to_csv(path, index=False)
            paths.append(path)
        path = os.path.join(output_dir, "bench-environment.json")
        with open(path, "w") as f:
            json.dump(self.env, f, indent=1, default=str)
        paths.append(path)
        for name, fig in self.charts().items():
            paths.append(plotting.save(fig, output_dir, f"bench-{name}"))
        return paths

    def _repr_html_(self):
        return self.summary().round(3)._repr_html_()


def env_line(env):
    accel = (env.get("vm_accel_used") or env.get("vm_accel") or "?").upper()
    vm = f"VM under {accel}, " if "vm" in env.get("cases", CASES) else ("no VM, " if env.get("vm_missing") else "")
    return (f"kernel {env.get('kernel')}, {env.get('machine')}, {env.get('cores')} cores, "
            f"{env.get('cgroup_mode')} cgroups, {vm}{env.get('mode')} mode")


def run(lab, mode="quick", **kw):
    """Bench(lab, mode, **kw).run()."""
    return Bench(lab, mode, **kw).run()


__all__ = ["Bench", "BenchResult", "PLANS", "EXPERIMENTS", "run"]
