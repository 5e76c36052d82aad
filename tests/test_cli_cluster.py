"""Lab 09's verbs of the `labkit` command (cluster, node, service, stack), unprivileged: no agent runs.

What is tested is the command line's half: which agent method each verb calls with which parameters, how it
prints the answers, which cluster it talks to, and what it refuses before calling anything. The agent's half
(the methods themselves) is tested for real in tests/test_cluster.py and tests/test_manager.py.
"""
import json
import re
import types

import pytest

from labkit import cli
from labkit.wire import words
from labkit.wire.errors import InvalidSpec
from labkit.wire.orchestration import HealthCheck, ServiceSpec, StackSpec, duration
from labkit.wire.specs import ClusterSpec


class FakeAgent:
    """Stands in for the Lab and the agent behind it (``cli._lab`` returns it): it records every
    ``call(method, **params)`` and answers with ``answers[method]`` (a canned result, or a function of the
    params). Nothing runs: it only shows what the CLI asks for and how the CLI prints the answers."""

    def __init__(self):
        self.calls = []
        self.answers = {"cluster.list": [{"name": "demo", "nodes": []}], "service.ls": [], "service.ps": []}

    def call(self, method, **params):
        self.calls.append((method, params))
        answer = self.answers.get(method)
        return answer(**params) if callable(answer) else answer


@pytest.fixture
def agent(monkeypatch):
    fake = FakeAgent()
    monkeypatch.setattr(cli, "_lab", lambda args: fake)
    monkeypatch.delenv("LABKIT_CLUSTER", raising=False)
    return fake


def run(*argv):
    return cli.main(list(argv))


NODES = [{"id": "demo-manager", "name": "manager", "role": "manager", "ip": "10.209.0.10", "status": "ready",
          "availability": "active"},
         {"id": "demo-worker1", "name": "worker1", "role": "worker", "ip": "10.209.0.11", "status": "down",
          "availability": "drain"}]


def test_duration_reads_dockers_durations():
    assert duration("500ms") == 0.5 and duration("2s") == 2.0 and duration("1m30s") == 90.0
    assert duration("0") == 0.0 and duration("1h") == 3600.0
    for bad in ("2x", "10", "-1s", "2h"):
        with pytest.raises(InvalidSpec):
            duration(bad, "--update-delay")


# -- which cluster ---------------------------------------------------------------------------------------------

def test_the_only_cluster_is_the_default(agent, capsys):
    assert run("service", "ls") == 0
    assert agent.calls == [("cluster.list", {}), ("service.ls", {"name": "demo"})]


def test_no_cluster_says_how_to_make_one(agent, capsys):
    agent.answers["cluster.list"] = []
    assert run("node", "ls") == 1
    assert "make one: labkit cluster create demo" in capsys.readouterr().err
    assert agent.calls == [("cluster.list", {})]


def test_several_clusters_are_listed_and_need_cluster(agent, capsys):
    agent.answers["cluster.list"] = [{"name": "a", "nodes": []}, {"name": "b", "nodes": []}]
    assert run("service", "ps", "web") == 1
    err = capsys.readouterr().err
    assert "a, b" in err and "--cluster" in err
    assert agent.calls == [("cluster.list", {})]
    assert run("service", "ps", "--cluster", "b", "web") == 0
    assert agent.calls[-1] == ("service.ps", {"name": "b", "service": "web"})


def test_labkit_cluster_chooses_and_cluster_beats_it(agent, monkeypatch, capsys):
    monkeypatch.setenv("LABKIT_CLUSTER", "envy")
    agent.answers["stack.ls"] = []
    assert run("stack", "ls") == 0
    assert agent.calls == [("stack.ls", {"name": "envy"})], "the environment names it: no cluster.list"
    assert run("stack", "ls", "--cluster", "given") == 0
    assert agent.calls[-1] == ("stack.ls", {"name": "given"})


# -- cluster ---------------------------------------------------------------------------------------------------

def test_cluster_create_makes_it_then_starts_its_manager_and_prints_the_nodes(agent, capsys):
    agent.answers["cluster.create"] = {"steps": [], "cluster": {"name": "demo", "nodes": NODES}}
    assert run("cluster", "create", "--workers", "3", "--tasks", "10.220.0.0/16", "demo") == 0
    assert agent.calls == [("cluster.create", {"spec": ClusterSpec("demo", 3, tasks="10.220.0.0/16").to_dict()}),
                           ("cluster.manage", {"name": "demo"})]
    out = capsys.readouterr().out
    assert re.search(r"demo-manager\s+manager\s+Ready\s+Active\s+Leader", out), out
    agent.calls.clear()
    assert run("cluster", "create", "--workers", "9", "big") == 2, "labkit's own verb: its error exits 2"
    assert "workers" in capsys.readouterr().err and agent.calls == [], "refused before the agent is asked"


def test_cluster_ls_rm_inspect(agent, capsys):
    agent.answers["cluster.list"] = [{"name": "demo", "nodes": NODES, "manager": {"pid": 4242}},
                                     {"name": "idle", "nodes": NODES[:1]}]
    agent.answers["cluster.inspect"] = lambda name: {"name": name, "nodes": NODES}
    assert run("cluster", "ls") == 0
    out = capsys.readouterr().out
    assert re.search(r"demo\s+2\s+4242", out) and re.search(r"idle\s+1\s+-", out), out
    assert run("cluster", "rm", "a", "b") == 0
    assert agent.calls[-2:] == [("cluster.remove", {"name": "a"}), ("cluster.remove", {"name": "b"})]
    capsys.readouterr()
    assert run("cluster", "inspect", "demo") == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "demo", "nodes": NODES}]


# -- node ------------------------------------------------------------------------------------------------------

def test_node_ls_update_inspect(agent, capsys):
    agent.answers["cluster.inspect"] = lambda name: {"name": name, "nodes": NODES}
    assert run("node", "ls") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER", "STATUS"]
    assert re.search(r"demo-worker1\s+worker1\s+Down\s+Drain\s*$", out, re.M), out
    assert run("node", "update", "--availability", "drain", "worker1") == 0
    assert agent.calls[-1] == ("cluster.node_update", {"name": "demo", "node": "worker1", "availability": "drain"})
    assert run("node", "update", "--availability", "asleep", "worker1") == 125, "a usage error, as Docker's"
    capsys.readouterr()
    assert run("node", "inspect", "worker1", "demo-manager") == 0
    assert json.loads(capsys.readouterr().out) == [NODES[1], NODES[0]]
    assert run("node", "inspect", "worker9") == 1
    assert "no such node" in capsys.readouterr().err


# -- service ---------------------------------------------------------------------------------------------------

def test_service_create_builds_the_spec_and_leaves_the_commands_options_alone(agent, capsys):
    argv = ["service", "create", "--name", "web", "--replicas", "3", "-p", "8080:80", "-p", "5353:53/udp",
            "-e", "A=1", "--health-cmd", "wget -q -O- localhost || exit 1", "--health-interval", "500ms",
            "--health-retries", "2", "--health-start-period", "1m30s", "--health-timeout", "3s",
            "--update-parallelism", "2",
            "--update-delay", "2s", "--update-failure-action", "pause",
            "busybox", "httpd", "-f", "-p", "80", "--name", "not-labkits"]
    assert run(*argv) == 0
    spec = ServiceSpec("web", "busybox", replicas=3, cmd=("httpd", "-f", "-p", "80", "--name", "not-labkits"),
                       env={"A": "1"}, ports=("8080:80", "5353:53/udp"),
                       health=HealthCheck(("sh", "-c", "wget -q -O- localhost || exit 1"), interval=0.5, retries=2,
                                          start_period=90.0, timeout=3.0),
                       update_parallelism=2, update_delay=2.0, update_failure_action="pause")
    assert agent.calls[-1] == ("service.create", {"name": "demo", "spec": spec.to_dict()})
    assert agent.calls[-1][1]["spec"]["health"]["cmd"] == ("sh", "-c", "wget -q -O- localhost || exit 1"), \
        "--health-cmd is a shell's command, as Docker's (CMD-SHELL)"
    assert capsys.readouterr().out == "web\n"


def test_service_create_without_a_name_gets_one_and_the_specs_defaults(agent, capsys):
    assert run("service", "create", "busybox") == 0
    sent = agent.calls[-1][1]["spec"]
    assert re.fullmatch(r"svc-[0-9a-f]{6}", sent["name"]) and capsys.readouterr().out == sent["name"] + "\n"
    assert sent == ServiceSpec(sent["name"], "busybox").to_dict()


def test_service_create_refuses_bad_flags_before_asking_the_agent(agent, capsys):
    for flags, said in ((["--update-delay", "soon"], "--update-delay: 'soon' is not a duration"),
                        (["--health-interval", "1s"], "--health-cmd"),
                        (["--health-timeout", "1s"], "--health-cmd"),
                        (["--update-failure-action", "panic"], "update_failure_action"),
                        (["-p", "80"], "PUBLISHED:TARGET")):
        assert run("service", "create", *flags, "busybox") == 1, flags
        assert said in capsys.readouterr().err
    assert agent.calls == []


def test_service_ls_and_ps_print_as_docker(agent, capsys, monkeypatch):
    agent.answers["service.ls"] = [{"name": "web", "image": "busybox:latest", "replicas": 3, "running": 2,
                                    "ports": ["*:8080->80/tcp"], "update": None},
                                   {"name": "api", "image": "busybox:v2", "replicas": 1, "running": 1, "ports": [],
                                    "update": "rollback_started"}]
    assert run("service", "ls") == 0
    out = capsys.readouterr().out
    assert re.search(r"web\s+web\s+replicated\s+2/3\s+busybox:latest\s+\*:8080->80/tcp", out), out
    assert "1/1 (rollback_started)" in out
    now = 1_000_000.0
    monkeypatch.setattr(words, "time", types.SimpleNamespace(time=lambda: now))  # "ago" from a fixed now
    task = dict(service="web", image="busybox:latest", container=None, error=None)
    agent.answers["service.ps"] = lambda name, service: [
        dict(task, id="old1", slot=1, node="worker1", desired="shutdown", state="failed", error="exit 1\n",
             since=now - 90),
        dict(task, id="new1", slot=1, node="manager", desired="running", state="running", since=now - 3),
        dict(task, id="new2", slot=2, node="worker1", desired="running", state="starting", since=now - 0.2)]
    assert run("service", "ps", "web") == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"ID\s+NAME\s+IMAGE\s+NODE\s+DESIRED STATE\s+CURRENT STATE\s+ERROR", lines[0])
    assert re.match(r"new1\s+web\.1\s+busybox:latest\s+manager\s+Running\s+Running 3 seconds ago", lines[2])
    assert re.match(r'old1\s+\\_ web\.1\s+.*Shutdown\s+Failed about a minute ago\s+"exit 1"', lines[3]), lines[3]
    assert re.match(r"new2\s+web\.2\s+.*Starting less than a second ago", lines[4]), lines[4]


def test_service_scale_makes_one_call_per_service_after_checking_them_all(agent, capsys):
    assert run("service", "scale", "web=3", "api=2") == 0
    assert agent.calls[1:] == [("service.update", {"name": "demo", "service": "web", "replicas": 3}),
                               ("service.update", {"name": "demo", "service": "api", "replicas": 2})]
    assert capsys.readouterr().out == "web scaled to 3\napi scaled to 2\n"
    agent.calls.clear()
    for bad in ("web", "web=x", "=3", "web=-1"):
        assert run("service", "scale", "api=2", bad) == 1
        assert "SERVICE=REPLICAS" in capsys.readouterr().err
    assert agent.calls == [], "nothing scaled when one of them does not read"


def test_service_update_rollback_rm_inspect(agent, capsys):
    assert run("service", "update", "web") == 1
    assert "--image" in capsys.readouterr().err and agent.calls == [], "neither --image nor --replicas: refused"
    assert run("service", "update", "--image", "busybox:v2", "web") == 0
    assert agent.calls[-1] == ("service.update", {"name": "demo", "service": "web", "image": "busybox:v2",
                                                  "replicas": None})
    assert run("service", "update", "--replicas", "0", "web") == 0
    assert agent.calls[-1] == ("service.update", {"name": "demo", "service": "web", "image": None, "replicas": 0})
    assert run("service", "rollback", "web") == 0
    assert agent.calls[-1] == ("service.rollback", {"name": "demo", "service": "web"})
    assert run("service", "rm", "web", "api") == 0
    assert agent.calls[-2:] == [("service.rm", {"name": "demo", "service": "web"}),
                                ("service.rm", {"name": "demo", "service": "api"})]
    capsys.readouterr()
    agent.answers["service.inspect"] = lambda name, service: {"name": service, "cluster": name}
    assert run("service", "inspect", "web") == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "web", "cluster": "demo"}]


# -- stack -----------------------------------------------------------------------------------------------------

COMPOSE = """version: '3.8'
services:
  web:
    image: busybox
    command: httpd -f -p 80
    ports: ['8080:80']
    deploy: {replicas: 2, update_config: {delay: 2s}}
"""


def test_stack_deploy_reads_the_compose_file(agent, capsys, tmp_path):
    path = tmp_path / "stack.yml"
    path.write_text(COMPOSE)
    agent.answers["stack.deploy"] = {"created": ["demo_web"], "updated": ["demo_api"]}
    assert run("stack", "deploy", "-c", str(path), "demo") == 0
    import yaml
    spec = StackSpec.from_compose("demo", yaml.safe_load(COMPOSE)).to_dict()
    assert agent.calls[-1] == ("stack.deploy", {"name": "demo", "spec": spec})
    assert capsys.readouterr().out == "Creating service demo_web\nUpdating service demo_api\n"


@pytest.mark.parametrize("text, said", [
    ("# padding\n" * 120_000, "over 1 MiB"),
    ("- web\n- api\n", "not a mapping"),
    ("", "empty"),
    ("services: {web: {image: busybox, bogus: 1}}\n", "services.web.bogus: Compose file format 3 has no such key"),
    ("services: [unclosed\n", "is not YAML"),
])
def test_stack_deploy_refuses_what_is_not_a_compose_file(agent, capsys, tmp_path, text, said):
    path = tmp_path / "stack.yml"
    path.write_text(text)
    assert run("stack", "deploy", "--compose-file", str(path), "demo") == 1
    err = capsys.readouterr().err
    assert said in err and "fix:" in err, err
    assert agent.calls == [], "refused before the agent is asked"


def test_stack_deploy_of_a_missing_file(agent, capsys, tmp_path):
    assert run("stack", "deploy", "-c", str(tmp_path / "none.yml"), "demo") == 1
    assert "cannot read" in capsys.readouterr().err


def test_stack_ls_ps_rm(agent, capsys):
    agent.answers["stack.ls"] = [{"name": "demo", "services": 2}]
    assert run("stack", "ls") == 0
    assert re.search(r"demo\s+2", capsys.readouterr().out)
    agent.answers["stack.ps"] = lambda name, stack: [
        {"id": "t1", "service": f"{stack}_web", "slot": 1, "node": "manager", "image": "busybox:latest",
         "desired": "running", "state": "running", "container": "c1", "error": None, "since": 0.0}]
    assert run("stack", "ps", "demo") == 0
    assert agent.calls[-1] == ("stack.ps", {"name": "demo", "stack": "demo"})
    assert re.search(r"t1\s+demo_web\.1\s+busybox:latest\s+manager\s+Running", capsys.readouterr().out)
    agent.answers["stack.rm"] = lambda name, stack: {"removed": [f"{stack}_api", f"{stack}_web"]}
    assert run("stack", "rm", "demo") == 0
    assert agent.calls[-1] == ("stack.rm", {"name": "demo", "stack": "demo"})
    assert capsys.readouterr().out == "Removing service demo_api\nRemoving service demo_web\n"
