"""The overhead harness, for real: every experiment, the three cases, one run (quick plan, few repeats)."""
import json
import os
import subprocess
import sys

import pytest

from labkit.course import bench
from labkit.wire.errors import InvalidSpec

from conftest import REPO

pytestmark = [pytest.mark.privileged]


def test_bad_plans_say_what_to_do(lab):
    with pytest.raises(InvalidSpec, match="quick"):
        bench.Bench(lab, "fast")
    with pytest.raises(InvalidSpec, match="unknown experiment"):
        bench.Bench(lab, experiments=["gpu"])
    with pytest.raises(InvalidSpec, match="native"):
        bench.Bench(lab, cases=["container", "vm"])
    with pytest.raises(InvalidSpec, match="repeats"):
        bench.Bench(lab, repeats=0)


@pytest.mark.slow
def test_one_run_measures_everything_and_keeps_raw_samples(lab, tmp_path):
    b = bench.Bench(lab, "quick", accel="tcg", repeats=2, progress=False)
    b.plan = dict(b.plan, startup_runs=3, vm_boots=1, density=(1, 2))
    res = b.run()
    df = res.samples
    assert set(df["experiment"]) == set(bench.EXPERIMENTS)
    # raw samples: warm-up dropped, every repeat kept, for every case
    for exp in bench.WORKLOADS:
        got = df[df["experiment"] == exp].groupby("case").size().to_dict()
        assert got == {"native": 2, "container": 2, "vm": 2}, (exp, got)
    nets = set(df[df["experiment"] == "net-throughput"]["case"])
    assert nets == {"native", "container (bridge)", "container (NAT)", "vm"}
    starts = set(df[df["experiment"] == "startup"]["case"])
    assert {"process", "unshare", "labkit", "vm"} <= starts
    for runtime in ("crun", "runc"):
        assert runtime in starts or any(n.startswith(runtime) for n in res.env["notes"])
    s = res.summary()
    assert (s["min"] <= s["median"]).all() and (s["median"] <= s["max"]).all()
    native = s[(s["case"] == "native") & ~s["experiment"].isin(["startup"]) & ~s["experiment"].str.startswith("density")]
    assert (native["time vs native"] == 1.0).all()
    r = res.ratios()
    assert "VM (TCG)" in r.columns and "container" in r.columns, "the VM's accelerator is in its label"
    assert r.loc["cpu", "container"] > 0 and r.loc["cpu", "VM (TCG)"] > 1, "TCG emulates every instruction"
    d = df[df["experiment"] == "density"]
    assert set(d["instances"]) == {1, 2} and (d["pss_kb"] > 0).all()
    vm_pss = d[d["case"] == "vm"]["pss_kb"].median()
    box_pss = d[d["case"] == "container"]["pss_kb"].median()
    assert vm_pss > 10 * box_pss, "an idle VM carries a kernel and its RAM; an idle container a process"
    assert res.env["vm_accel_used"] == "tcg" and any("TCG" in n for n in res.env["notes"])
    assert res.env["cgroup_mode"] in ("v1", "v2", "hybrid") and res.env["kernel"] == os.uname().release
    paths = res.save(str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(["bench-samples.csv", "bench-summary.csv", "bench-environment.json",
                            "bench-startup.png", "bench-overhead.png", "bench-density.png"])
    assert json.load(open(tmp_path / "bench-environment.json"))["mode"] == "quick"
    assert subprocess.run(["pgrep", "-f", "labkit-vm-"], capture_output=True).returncode == 1, "no qemu left"


def test_the_cli_runs_a_subset_with_a_progress_bar_and_writes_files(tmp_path):
    res = subprocess.run([sys.executable, "-m", "labkit.cli", "bench", "--target", "local", "--only", "cpu,fork",
                          "--cases", "native,container", "--repeats", "2", "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "] " in res.stderr and "/" in res.stderr, "progress on stderr"
    assert "cpu" in res.stdout and "container" in res.stdout and "time vs native" in res.stdout
    assert (tmp_path / "bench-samples.csv").exists() and (tmp_path / "bench-overhead.png").exists()
    bad = subprocess.run([sys.executable, "-m", "labkit.cli", "bench", "--target", "local", "--only", "gpu"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "choose from" in bad.stderr


@pytest.mark.privileged
@pytest.mark.slow
def test_the_grader_rebuilds_the_figures_from_what_the_agent_answered(lab, tmp_path):
    """A run made through the grader's relay, rebuilt from its journal alone, has the same start-up, CPU and
    density figures as the result the notebook computed (what 07.3 is graded from)."""
    import labkit
    from labkit.course.relay import Relay
    d = tmp_path / "sandbox"
    d.mkdir(mode=0o700)
    with Relay(lab.transport, str(d / "relay.sock")) as relay:
        with labkit.connect("unix://" + relay.path) as student:
            live = bench.Bench(student, "quick", experiments=["startup", "cpu", "density"],
                               cases=("native", "container"), progress=False).run()
        [rebuilt] = bench.BenchResult.from_journal(relay.journal)
    cols = ["experiment", "case", "n", "min", "median", "max"]
    want = live.summary()[cols].round(9).to_dict("records")
    got = rebuilt.summary()[cols].round(9).to_dict("records")
    assert got == want
    assert live.ratios().round(9).equals(rebuilt.ratios().round(9))
    assert rebuilt.env["rebuilt_from"] == "the agent's journal" and rebuilt.env["kernel"] == live.env["kernel"]


def _result(factors, n, spread=0.02, seed=1):
    import numpy as np
    rng = np.random.default_rng(seed)
    samples = [{"experiment": exp, "case": case, "repeat": r, "elapsed_s": m * (1 + spread * rng.standard_normal()),
                "amount": 1, "unit": "x"}
               for exp, f in factors.items() for r in range(n) for case, m in (("native", 1.0), ("container", f))]
    return bench.BenchResult(samples, {"cases": ["native", "container"]}, {})


def test_each_ratio_says_what_its_interval_allows():
    """A ratio whose 95% interval holds 1.0 is no measurable difference, whatever its median; one that leaves
    1.0 is slower or faster; too few samples, or an interval too wide to tell, say so."""
    got = _result({"cpu": 1.0, "fork": 1.3, "memory": 0.7}, 8).intervals().set_index("experiment")
    assert got.loc["cpu", "verdict"] == "no measurable difference" and got.loc["cpu", "low"] <= 1 <= got.loc["cpu", "high"]
    assert got.loc["fork", "verdict"].endswith("slower") and got.loc["fork", "low"] > 1
    assert got.loc["memory", "verdict"].endswith("faster") and got.loc["memory", "high"] < 1
    assert (got["low"] <= got["ratio"]).all() and (got["ratio"] <= got["high"]).all()
    assert _result({"cpu": 0.61}, 3).intervals()["verdict"][0].startswith("too few samples")
    noisy = _result({"cpu": 1.0}, 8, spread=0.4, seed=3).intervals().iloc[0]
    assert "too noisy" in noisy["verdict"] and noisy["low"] < 1 < noisy["high"] and bench.undecided(noisy["verdict"])
    fig = bench.BenchResult(_result({"cpu": 1.0, "fork": 1.3}, 8).samples.to_dict("records"),
                            {"cases": ["native", "container"]}, {}).charts()["overhead"]
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels[0] == "≈1" and 1.2 < float(labels[1]) < 1.4, labels  # cpu holds 1.0; fork's ratio is its own


def test_quick_mode_repeats_a_case_until_it_can_tell_or_says_it_cannot(lab):
    b = bench.Bench(lab, "quick", experiments=["cpu"], cases=("native", "container"), progress=False)
    res = b.run()
    n = res.samples.groupby("case").size().to_dict()
    assert bench.MIN_TO_TELL <= n["container"] <= b.plan["max_repeats"] and n["native"] == n["container"], n
    v = res.intervals().iloc[0]["verdict"]
    assert not bench.undecided(v) or any(note.startswith("cpu, container: no measurable difference, but too noisy")
                                     for note in res.env["notes"]), \
        (v, res.env["notes"])


def test_a_host_port_someone_holds_is_a_conflict_and_the_harness_takes_another(lab, monkeypatch):
    """A connection's own local port (what a random pick in Linux's ephemeral range can hit: CI once waited
    30 s on a refused port because nc could not bind) is refused at serve time, and the harness picks again."""
    import socket
    from labkit.wire.errors import Conflict
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    held = socket.socket()
    held.bind(("0.0.0.0", 0))
    held.connect(srv.getsockname())
    port = held.getsockname()[1]
    try:
        with pytest.raises(Conflict, match=f"port {port} is already taken"):
            lab.call("bench.net_serve", case="native", mode="latency", port=port)
        b = bench.Bench(lab, "quick", experiments=["net-latency"], cases=["native"], progress=False)
        # the held port first, then a free one (20000 + 2000)
        monkeypatch.setattr(bench.secrets, "randbelow", _first_then(port - 20000, 2000))
        got = b._serve("native", "latency", None, None, None)
        assert got == 22000
        assert lab.call("bench.net_measure", ip="127.0.0.1", port=got, mode="latency", amount=3)["amount"] == 3
    finally:
        held.close()
        srv.close()


def _first_then(*values):
    it = iter(values)
    return lambda n: next(it)
