"""Namespaces, checked against the truth in /proc on the host."""
import os

import pytest

from labkit.agent import namespaces
from labkit.wire.errors import CommandTimeout, MechanismError
from labkit.wire.specs import NAMESPACES

pytestmark = pytest.mark.privileged


def test_each_namespace_alone_is_new_and_only_that_one(lab):
    host = namespaces.inodes()
    for n in NAMESPACES:
        rec = lab.probe(namespaces=[n])
        assert rec.facts["shares_with_host"] == {m: m != n for m in NAMESPACES}, n
        assert rec.facts["ns"][n] != host[n]


def test_pid_namespace_without_its_own_proc_still_lists_the_host(lab):
    view = lab.probe(namespaces=["pid"]).facts["view"]
    assert view["pid"] == 1 and view["host_pids_visible"] is True
    view = lab.probe(namespaces=["pid", "mnt"]).facts["view"]
    assert view["pid"] == 1 and view["host_pids_visible"] is False and view["pids_visible"] == 1


def test_user_namespace_maps_root_to_an_unprivileged_uid(lab):
    rec = lab.run_in(["sh", "-c", "id -u; cat /proc/self/uid_map; touch /etc/labkit-should-not-exist"],
                     ["user", "mnt"])
    lines = rec.stdout.split("\n")
    assert lines[0] == "0" and lines[1].split() == ["0", "100000", "65536"]
    assert rec.exit_code != 0 and not os.path.exists("/etc/labkit-should-not-exist"), \
        "root in a user namespace must not write the host's /etc"
    steps = rec.steps
    assert any(s.get("op") == "write" and s["path"].endswith("/uid_map") for s in steps)


def test_cgroup_namespace_shows_its_own_root(lab):
    view = lab.probe(namespaces=["cgroup"]).facts["view"]
    assert view["cgroup"] and view["cgroup"][-1].endswith(":/")


def test_hostname_stays_inside(lab):
    before = open("/proc/sys/kernel/hostname").read()
    assert lab.run_in(["hostname"], ["uts"], hostname="inside").stdout.strip() == "inside"
    assert open("/proc/sys/kernel/hostname").read() == before


def test_exec_in_joins_the_namespaces(lab):
    with lab.spawn(namespaces=["uts", "net", "pid", "mnt"], hostname="joined") as p:
        out = p.exec(["sh", "-c", "hostname; cat /proc/self/net/dev | wc -l; readlink /proc/self/ns/uts"]).stdout
        name, devlines, uts = out.split()
        assert name == "joined" and int(devlines) == 3  # two header lines + lo
        assert uts == f"uts:[{p.inspect()['ns_now']['uts']}]"
        # the host's root enters like `docker exec` (labkit.agent.enter, from the sealed interpreter copy)
        assert p.exec(["true"]).steps[0]["argv"][1:3] == ["-m", "labkit.agent.enter"]


def test_a_missing_program_is_a_clear_error(lab):
    with pytest.raises(MechanismError, match="execve") as err:
        lab.run_in(["no-such-program"], ["uts"])
    assert "exists in the process's root" in err.value.fix


def test_a_process_that_runs_too_long_is_killed(lab):
    with pytest.raises(CommandTimeout):
        lab.run_in(["sleep", "30"], ["pid", "mnt"], timeout=1)
    assert lab.processes() == []


def test_stop_escalates_to_sigkill(lab):
    p = lab.spawn(["sh", "-c", "trap '' TERM; while :; do sleep 1; done"], ["pid", "mnt"])
    rec = p.stop(timeout=0.5)
    assert [s["args"][1] for s in rec.steps if s.get("call") == "kill"] == ["SIGTERM", "SIGKILL"]
    assert rec.facts["stopped"] is True
