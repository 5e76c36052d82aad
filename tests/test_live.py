"""Live views for real: a cgroup with a CPU hog and a memory user inside, a network a container joins; each
view reads the target at its own bounded pace and stops when closed."""
import time

import pytest

from labkit.course import live
from labkit.wire.errors import LabkitError

pytestmark = pytest.mark.privileged


def test_a_cgroup_view_follows_a_hog_against_its_limits_and_stops_when_closed(lab):
    cg = lab.cgroup("t-live", memory="64M", cpus=0.5)
    try:
        hog = cg.spawn(["sh", "-c", "while :; do :; done"])
        view = live.cgroup_usage(lab, cg, interval=0.25)
        box = view.widget()
        view.start()
        deadline = time.monotonic() + 30
        while view.samples < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert view.samples >= 6 and view.running
        assert max(view.cpu) > 0, "the hog's CPU use shows"
        assert view.limits == {"memory_mib": 64.0, "cpu_percent": 50.0}, "the limits are drawn as they are"
        cpu_line = view.figs[1][1]
        assert len(cpu_line.x) == len(view.t) and list(view.figs[1][2].y) == [50.0, 50.0], "the charts hold the data"
        box.close()
        assert not view.running, "closing the widget stops its thread"
        n = view.samples
        time.sleep(0.6)
        assert view.samples == n, "and it reads the target no more"
        hog.stop()
    finally:
        cg.remove()


def test_a_view_whose_subject_goes_away_says_so_and_stops(lab):
    cg = lab.cgroup("t-live2")
    view = live.cgroup_usage(lab, cg, interval=0.25)
    view.widget()
    view.start()
    time.sleep(0.6)
    cg.remove()
    deadline = time.monotonic() + 10
    while view.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not view.running and view.error is not None and "stopped" in view.status.value


def test_the_topology_view_shows_a_container_join_and_leave(lab):
    net = lab.network("tlive", subnet="10.214.9.0/24")
    view = live.topology(lab, interval=0.25)
    view.widget()
    try:
        view.update()
        assert "lkbr-tlive" in view.html.value and "10.214.9.1" in view.html.value
        c = lab.run_container("busybox", ["sleep", "600"], name="t-live-c", network="tlive")
        ip = c.ip
        view.update()
        assert ip.startswith("10.214.9.") and f">{ip}<" in view.html.value, "the container's address is on the bridge"
        c.rm(force=True)
        view.update()
        assert f">{ip}<" not in view.html.value, "and gone when it is"
    finally:
        view.stop()
        net.remove()


def test_refresh_is_bounded():
    with pytest.raises(LabkitError, match="too short"):
        live.topology(None, interval=0.01)


def test_the_layers_view_shows_a_containers_writes_and_deletions_in_its_upper_dir(lab):
    root = lab.container_root("busybox", "t-live-layers")
    try:
        view = live.layers(lab, root, interval=0.25)
        view.widget()
        view.update()
        assert "nothing changed yet" in view.html.value and "read-only" in view.html.value
        root.run(["sh", "-c", "echo hi > /hello.txt; rm /bin/true"])
        view.update()
        kinds = {c["path"]: c["kind"] for c in view.changes}
        assert kinds.get("/hello.txt") == "file" and kinds.get("/bin/true", "").startswith("whiteout"), kinds
        assert "/hello.txt" in view.html.value and "whiteout" in view.html.value
    finally:
        root.remove()


def test_the_process_view_shows_a_process_in_namespaces_of_its_own_and_its_going(lab):
    view = live.processes(lab, interval=0.25)
    view.widget()
    p = lab.spawn(["sleep", "600"], ["pid", "uts", "mnt"], name="t-live-p")
    try:
        view.update()
        row = next(r for r in view.rows if r["process"] == "t-live-p")
        assert row["host PID"] == p.pid and row["PID inside"] != "(host's)" and row["PID inside"] < p.pid
        own = set(row["own namespaces"].split())
        assert {"pid", "uts", "mnt"} <= own and "net" not in own, row
        assert "t-live-p" in view.html.value
    finally:
        p.stop()
    view.update()
    assert not any(r["process"] == "t-live-p" for r in view.rows), "a stopped process leaves the view"
