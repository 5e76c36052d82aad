"""Specs are pure: validation and normalisation without touching the kernel."""
import pytest

from labkit.wire.errors import InvalidSpec
from labkit.wire.specs import NAMESPACES, ProcessSpec, RootfsSpec, check_name, normalize_namespaces, rootfs_path


def test_namespaces_normalise_aliases_and_order():
    assert normalize_namespaces(["network", "mount", "uts"]) == ("uts", "mnt", "net")
    assert normalize_namespaces("pid,user") == ("pid", "user")
    assert normalize_namespaces("all") == NAMESPACES
    assert normalize_namespaces(None) == ()


def test_unknown_namespace_says_which_exist():
    with pytest.raises(InvalidSpec) as err:
        normalize_namespaces(["uts", "time-travel"])
    assert "time-travel" in str(err.value) and "uts, pid, mnt" in err.value.fix


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../etc", "Demo", "-x", "a" * 64, "x..y", None])
def test_bad_names_are_refused(bad):
    with pytest.raises(InvalidSpec):
        check_name(bad)


def test_rootfs_paths_stay_inside_labkit_state():
    assert rootfs_path("demo") == "/var/lib/labkit/rootfs/demo"
    assert rootfs_path("/var/lib/labkit/rootfs/demo/") == "/var/lib/labkit/rootfs/demo"
    for bad, msg in [("/", "host itself"), ("//", "host itself"), ("/etc", "outside"),
                     ("/var/lib/labkit/rootfs/../../../etc", "outside"), ("/var/lib/labkit/rootfs", "outside"),
                     ("/var/lib/labkit/rootfs/a/b", "outside")]:
        with pytest.raises(InvalidSpec, match=msg):
            rootfs_path(bad)


def test_process_spec_rules():
    s = ProcessSpec(argv=["hostname"], namespaces=["uts", "mount"], hostname="box")
    assert s.namespaces == ("uts", "mnt") and s.argv == ("hostname",)
    assert ProcessSpec.from_dict(s.to_dict()) == s
    with pytest.raises(InvalidSpec, match="rename the host"):
        ProcessSpec(argv=["true"], hostname="box")
    with pytest.raises(InvalidSpec, match="mount namespace"):
        ProcessSpec(argv=["true"], rootfs="demo", root_mode="pivot_root")
    with pytest.raises(InvalidSpec, match="list of arguments"):
        ProcessSpec(argv="ls -l")
    with pytest.raises(InvalidSpec, match="nothing to run"):
        ProcessSpec()
    with pytest.raises(InvalidSpec, match="hostname"):
        ProcessSpec(argv=["true"], namespaces=["uts"], hostname="bad host!")
    with pytest.raises(InvalidSpec, match="unknown process option"):
        ProcessSpec.from_dict({"argv": ["true"], "privileged": True})
    with pytest.raises(InvalidSpec, match="escape needs a root"):
        ProcessSpec(action="escape")


def test_default_proc_mount_follows_the_namespaces():
    assert ProcessSpec(action="probe", namespaces=["pid"]).wants_proc is True
    assert ProcessSpec(action="probe").wants_proc is False
    assert ProcessSpec(action="probe", rootfs="demo").wants_proc is True


def test_rootfs_spec():
    assert RootfsSpec("demo").path == "/var/lib/labkit/rootfs/demo"
    with pytest.raises(InvalidSpec, match="built-in image"):
        RootfsSpec("demo", image="ubuntu")


# -- the agent is root: every value is an attack until checked -------------------------------------------
from labkit.wire import specs  # noqa: E402
from labkit.wire.specs import CgroupSpec, ImageRef, NetworkSpec, PortSpec, check_hostname, parse_size  # noqa: E402


@pytest.mark.parametrize("make", [
    lambda: check_name("demo\n"),
    lambda: rootfs_path("demo\n"),
    lambda: RootfsSpec("demo\n"),
    lambda: check_hostname("box\n"),
    lambda: ImageRef.parse("busybox\n"),
    lambda: ImageRef.parse("busybox:v1\n"),
    lambda: ImageRef.parse("127.0.0.1:5000\n/course/web:v1"),
    lambda: NetworkSpec("net\n"),
    lambda: PortSpec.parse("8080:80\n"),
    lambda: ProcessSpec(argv=["true"], user="1000\n"),
    lambda: CgroupSpec("box", cpuset="0\n"),
    lambda: CgroupSpec("box\n"),
], ids=["name", "rootfs path", "rootfs spec", "hostname", "image", "tag", "registry host", "network", "port",
        "user", "cpuset", "cgroup"])
def test_a_trailing_newline_is_not_part_of_any_name(make):
    # '$' matches before a final newline: 'demo\n' passed and became /var/lib/labkit/rootfs/demo<newline>
    with pytest.raises(InvalidSpec) as err:
        make()
    assert err.value.fix


def test_no_pattern_in_specs_anchors_with_dollar():
    import inspect
    import re
    src = inspect.getsource(specs)
    assert not re.search(r"""re\.(match|search)\(""", src), "use fullmatch: '$' lets a trailing newline through"
    assert not re.search(r"""\$["']""", src.replace("'$'", "")), "a pattern ends with '$'; use fullmatch"


@pytest.mark.parametrize("host_ip", ["999.1.1.1", "1.2.3", "256.0.0.1", "::1", "localhost", 5])
def test_host_ip_must_be_an_ipv4_address(host_ip):
    with pytest.raises(InvalidSpec, match="IPv4") as err:
        PortSpec(8080, 80, host_ip=host_ip)
    assert "127.0.0.1" in err.value.fix
    with pytest.raises(InvalidSpec):
        PortSpec.parse(f"{host_ip}:8080:80")
    assert PortSpec.parse("127.0.0.1:8080:80/udp") == PortSpec(8080, 80, "127.0.0.1", "udp")


@pytest.mark.parametrize("port", ["abc", "80; touch /tmp/x", 0, 65536, -1, True, 1.5, None])
def test_ports_are_whole_numbers_in_range(port):
    with pytest.raises(InvalidSpec) as err:
        PortSpec(port, 80)
    assert "1..65535" in err.value.fix
    with pytest.raises(InvalidSpec):
        specs.check_port(port)
    assert specs.check_port(65535) == 65535 and PortSpec("8080", 80).host_port == 8080


@pytest.mark.parametrize("field, value, words", [
    ("period_us", "abc", "not a whole number"),      # was a ValueError: 'agent bug'
    ("period_us", 1.5, "not a whole number"),
    ("period_us", 10, "out of range"),
    ("cpu_weight", "heavy", "not a whole number"),
    ("cpu_weight", 0, "out of range"),
    ("pids", 0, "out of range"),
    ("pids", 4194305, "out of range"),                 # above the kernel's PID_MAX_LIMIT
    ("pids", 10 ** 12, "out of range"),
    ("pids", True, "not a whole number"),
    ("pids", "many", "not a whole number"),
    ("memory", "1k", "too small"),
    ("memory", 10 ** 30, "more than any lab machine"),
    ("memory", "5T", "more than any lab machine"),
    ("memory", "9" * 21, "not a size"),
    ("memory", "1e9", "not a size"),
    ("memory", -1, "too small"),
    ("swap", "64T", "more than any lab machine"),
    ("cpus", "abc", "not a number"),
])
def test_absurd_cgroup_limits_are_refused(field, value, words):
    with pytest.raises(InvalidSpec, match=words) as err:
        CgroupSpec("box", **{field: value})
    assert err.value.fix and err.value.message


def test_sane_cgroup_limits_pass_and_normalise():
    s = CgroupSpec("box", memory="32M", pids=specs.MAX_PIDS, period_us="50000", cpu_weight=50.0, cpus=0.5)
    assert s.memory == 32 << 20 and s.pids == 4194304 and s.period_us == 50000 and s.cpu_weight == 50
    assert CgroupSpec("box", memory=specs.MAX_MEMORY).memory == specs.MAX_MEMORY
    assert parse_size("1.5G") == 3 << 29 and parse_size(" 64 MiB ") == 64 << 20
    assert CgroupSpec.from_dict(s.to_dict()) == s
    with pytest.raises(InvalidSpec, match="unknown cgroup option"):
        CgroupSpec.from_dict({"name": "box", "memory_max": 1})
    with pytest.raises(InvalidSpec, match="must be an object"):
        CgroupSpec.from_dict(["box"])


@pytest.mark.parametrize("kw, words", [
    ({"id_map": [(0, "abc", 1)]}, "not a whole number"),
    ({"id_map": [(0, 100000)]}, "inside, outside, count"),
    ({"id_map": [(0, 100000, 0)]}, "out of range"),
    ({"id_map": [(0, 2 ** 32, 1)]}, "out of range"),
    ({"user": "99999999999"}, "uid"),
    ({"env": [("A",)]}, "pairs"),
    ({"env": {"A=B": "c"}}, "cannot be set"),
    ({"env": {"A": "x\0y"}}, "cannot be set"),
    ({"argv": ["echo", "a\0b"]}, "NUL"),
    ({"argv": 5}, "list of arguments"),
    ({"cwd": 5}, "absolute"),
])
def test_process_spec_refuses_values_that_would_break_inside_the_agent(kw, words):
    kw = {"argv": ["true"], **kw}
    with pytest.raises(InvalidSpec, match=words):
        ProcessSpec(**kw)
    with pytest.raises(InvalidSpec):
        ProcessSpec.from_dict(kw)


def test_no_validating_pattern_in_labkit_anchors_with_dollar():
    """Every module that checks input (not only specs.py): a pattern compiled as ^...$ without re.M is a
    validator, and '$' lets 'sha256:...\\n' or a fingerprint with a newline through."""
    import glob
    import os
    import re
    top = os.path.dirname(os.path.dirname(os.path.abspath(specs.__file__)))
    bad = []
    for path in glob.glob(os.path.join(top, "labkit", "**", "*.py"), recursive=True):
        for n, line in enumerate(open(path), 1):
            if re.search(r're\.compile\(r"\^[^"]*\$"\)', line):
                bad.append(f"{os.path.relpath(path, top)}:{n}")
    assert bad == [], "compile without ^/$ and use fullmatch: " + ", ".join(bad)


def test_a_spec_behaves_as_a_frozen_dataclass_would():
    """specs.frozen stands in for @dataclass(frozen=True): construction by position or name, defaults,
    normalisation in __post_init__, equality and hashing over the fields, no change once made, and the
    wire's plain dict (nested specs too) read back to an equal spec."""
    import json
    import subprocess
    import sys
    from labkit.wire.specs import ContainerSpec, PortSpec
    a, b = RootfsSpec("demo"), RootfsSpec(name="demo", image="busybox")
    assert a == b and hash(a) == hash(b) and a != RootfsSpec("other") and a != ("demo",)
    assert repr(a) == "RootfsSpec(name='demo', image='busybox', hostname='labkit')"
    with pytest.raises(AttributeError, match="frozen"):
        a.name = "x"
    with pytest.raises(AttributeError, match="frozen"):
        del a.name
    with pytest.raises(TypeError, match="missing required argument: 'name'"):
        RootfsSpec()
    with pytest.raises(TypeError, match="unexpected keyword argument 'nmae'"):
        RootfsSpec(nmae="demo")
    with pytest.raises(TypeError, match="multiple values"):
        RootfsSpec("demo", name="demo")
    p = PortSpec("8080", 80)  # normalised as it is made
    assert p.host_port == 8080 and p.to_dict() == {"host_port": 8080, "container_port": 80, "host_ip": "0.0.0.0",
                                                   "proto": "tcp"}
    c = ContainerSpec(image="busybox", ports=["127.0.0.1:8080:80"])
    wire = c.to_dict()
    assert list(wire["ports"]) == ["127.0.0.1:8080:80/tcp"] and wire["image"] == "busybox:latest"
    assert ContainerSpec.from_dict(json.loads(json.dumps(wire))) == c
    # and the dataclasses module (with inspect) is not what a labkit command pays for
    out = subprocess.run([sys.executable, "-c", "import sys, labkit.client.lab; print('dataclasses' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
