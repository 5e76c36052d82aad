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
