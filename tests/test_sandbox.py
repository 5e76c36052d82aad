"""The grader's sandboxes, attacked from inside: what a hostile kernel or agent can reach, and what is left.

Each test runs a real sandbox (labkit.agent.sandbox) as the grader makes it and looks from inside with
a small probe; each refusal is shown as the attack it stops.
"""
import json
import os
import subprocess
import sys

import pytest

from labkit.course.sandbox import Sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.privileged

PROBE = r'''
import json, os, socket, subprocess
def read(p):
    try:
        with open(p) as f:
            return f.read()
    except OSError as e:
        return "ERR " + type(e).__name__
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
out = {"uid": os.getuid(), "euid": os.geteuid(), "groups": os.getgroups(), "cap_eff": status("CapEff"),
       "cap_bnd": status("CapBnd"), "no_new_privs": status("NoNewPrivs"), "links": sorted(os.listdir("/sys/class/net")),
       "ifaces": sorted(n for _, n in socket.if_nameindex()),
       "cwd": os.getcwd(), "hidden_file": read(HIDDEN_FILE), "hidden_dir": os.listdir(HIDDEN_DIR),
       "run": sorted(os.listdir("/run")), "run_labkit": sorted(os.listdir("/run/labkit")),
       "grade": sorted(os.listdir("/run/labkit/grade")), "tmp": sorted(os.listdir("/tmp")), "hostname": socket.gethostname(),
       "cgroup": read("/proc/self/cgroup")}
try:
    open("/var/lib/labkit/planted", "w").write("x"); out["write_state"] = "written"
except OSError as e:
    out["write_state"] = type(e).__name__
try:
    s = socket.create_connection(("10.0.2.2", 80), timeout=1); out["net"] = "connected"
except OSError as e:
    out["net"] = type(e).__name__
try:
    subprocess.run(["su", "-c", "id"], input=b"", capture_output=True, timeout=5); out["su"] = "ran"
except Exception as e:
    out["su"] = type(e).__name__
open(os.path.join(os.getcwd(), "mine.txt"), "w").write("ok")
print(json.dumps(out))
'''


def _kernel_run(box, code, timeout=60):
    """Run ``python -c code`` as the sandbox's kernel would run (same spec, argv in its place)."""
    spec = box.kernel_spec([sys.executable, "-c", code])
    return subprocess.run([sys.executable, "-m", "labkit.agent.sandbox", json.dumps(spec.to_dict())],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def secrets_dir():
    """An instructor's folder that every user may read (not under /tmp: the kernel has a /tmp of its own)."""
    import pathlib
    import shutil
    import tempfile
    d = pathlib.Path(tempfile.mkdtemp(prefix="labkit-test-", dir="/srv" if os.path.isdir("/srv") else "/opt"))
    (d / "bundle.json").write_text("HIDDEN CHECKS")
    (d / "other-student.ipynb").write_text("ANOTHER STUDENT")
    os.chmod(d, 0o755)
    os.chmod(d / "other-student.ipynb", 0o644)
    os.chmod(d / "bundle.json", 0o644)
    yield d
    shutil.rmtree(d)


def test_a_kernel_is_nobody_with_no_network_and_sees_nothing_of_the_grader(lab, secrets_dir):
    hidden_file = str(secrets_dir / "bundle.json")
    with Sandbox(lab, sandbox="container", hide=[hidden_file, str(secrets_dir)]) as box:
        res = _kernel_run(box, f"HIDDEN_FILE={hidden_file!r}\nHIDDEN_DIR={str(secrets_dir)!r}\n" + PROBE)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["uid"] == got["euid"] == box.uid and got["uid"] != 0 and got["groups"] == []
        assert int(got["cap_eff"], 16) == 0, "no capability at all"
        assert got["no_new_privs"] == "1", "a setuid program cannot give root back"
        assert got["links"] == got["ifaces"] == ["lo"] and got["net"] in ("OSError", "ConnectionRefusedError")
        assert "HIDDEN" not in got["hidden_file"] and got["hidden_dir"] == [], "the bundle and other students' files are covered"
        assert got["run"] == ["labkit"] and got["run_labkit"] == ["grade"] and got["grade"] == [box.name], \
            "nothing of /run but the way to its own scratch: not the agent's state, not another kernel's"
        assert got["write_state"] in ("PermissionError", "OSError")
        assert got["cwd"] == box.scratch
        assert f"/labkit/{box.name}-k" in got["cgroup"], got["cgroup"]
        assert os.path.exists(os.path.join(box.scratch, "mine.txt")), "its own scratch is writable and shared"
        assert not os.path.exists("/var/lib/labkit/planted")
        scratch = box.scratch
    assert not os.path.exists(scratch), "the scratch directory goes with the sandbox"
    with Sandbox(lab, sandbox="container") as box:  # the attack, where nothing is hidden: the files are world-readable
        res = _kernel_run(box, f"print(open({hidden_file!r}).read())")
        assert res.stdout.strip() == "HIDDEN CHECKS", res.stderr


def test_two_kernels_cannot_reach_each_other(lab):
    with Sandbox(lab, sandbox="container") as a, Sandbox(lab, sandbox="container") as b:
        assert a.uid != b.uid and a.scratch != b.scratch
        res = _kernel_run(b, f"import os\ntry:\n    print(os.listdir({a.scratch!r}))\nexcept OSError as e:\n"
                             f"    print(type(e).__name__)")
        assert res.stdout.strip() in ("FileNotFoundError", "PermissionError"), res.stdout + res.stderr


def test_a_fork_bomb_and_a_memory_hog_stop_at_the_kernels_limits_and_nothing_outlives_it(lab):
    with Sandbox(lab, sandbox="container", kernel_limits={"memory": 256 << 20, "pids": 64}) as box:
        bomb = _kernel_run(box, "import os, time\nn = 0\nwhile True:\n    try:\n        if os.fork() == 0:\n"
                                "            os.close(1); os.close(2); time.sleep(600)\n        n += 1\n    except OSError:\n"
                                "        print(n); break\n", timeout=120)
        assert bomb.returncode == 0 and int(bomb.stdout) < 64, bomb.stdout + bomb.stderr
        left = lab.find("cgroup", box.kernel_cgroup.name).stats()
        assert left["pids_current"] > 1, "the bomb's children are still there until the sandbox ends"
        hog = _kernel_run(box, "x = bytearray(1 << 30)\nprint('survived')", timeout=120)
        assert "survived" not in hog.stdout and hog.returncode != 0, "the kernel's memory limit held"
        name = box.kernel_cgroup.name
    from labkit.wire.errors import NotFound
    with pytest.raises(NotFound):
        lab.find("cgroup", name)


def test_a_disposable_agent_starts_empty_and_takes_everything_with_it(lab):
    with Sandbox(lab, sandbox="container") as box:
        inner = box.lab
        out = inner.run(["sh", "-c", "hostname; ls /var/lib/labkit | wc -l; ip -o link | wc -l; "
                                     "grep CapBnd /proc/self/status; echo $$"]).stdout.split()
        assert out[0] == "grading-agent" and out[1] == "0" and out[2] == "1", out
        assert not int(out[4], 16) & (1 << 16), "CAP_SYS_MODULE is out of the bounding set"
        cg = inner.cgroup("t-inside", memory="64M")
        host_view = [d for d in lab.call("cgroup.detect")["v1"].values()] or ["/sys/fs/cgroup"]
        assert any(os.path.isdir(os.path.join(mp, "labkit", box.name + "-a", "labkit", "t-inside")) for mp in
                   set(host_view)), "what the agent makes lands below its own cgroup"
        assert cg.limits()["memory"] == 64 << 20
        inner.run_container("busybox", ["sleep", "600"], detach=True)
        mine = [os.path.join(mp, "labkit", box.name + "-a") for mp in set(host_view)]
        sentinel = os.path.join(REPO, "README.md")
        wrote = inner.run(["sh", "-c", f"echo x >> {sentinel}"])
        assert wrote.exit_code != 0 and "Read-only" in wrote.stderr, "the host's files are read-only in it"
        inner.run(["rm", "-rf", "--no-preserve-root", "/"], timeout=300)
        assert os.path.exists(sentinel) and os.path.exists(sys.executable), "rm -rf / removed nothing of the host's"
    assert not any(os.path.exists(d) for d in mine), "the agent's cgroup, and all below it, is gone"
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 600" not in ps and box.name not in ps, "no process of the sandbox is left"


def test_a_sandbox_refuses_to_hide_what_the_kernel_needs(lab):
    from labkit.wire.errors import LabkitError
    with pytest.raises(LabkitError, match="cannot be hidden"):
        Sandbox(lab, sandbox="container", hide=[sys.prefix])
    with pytest.raises(LabkitError, match="cannot be hidden"):
        Sandbox(lab, sandbox="container", hide=["/"])


def test_labkit_cleanup_removes_what_a_killed_grader_left(lab):
    """A grader killed mid-submission leaves cgroups, processes and a scratch directory: cleanup finds them all."""
    box = Sandbox(lab, sandbox="container").__enter__()
    spec = box.kernel_spec([sys.executable, "-c", "import time; time.sleep(600)"])
    kernel = subprocess.Popen([sys.executable, "-m", "labkit.agent.sandbox", json.dumps(spec.to_dict())])
    box.lab.run_container("busybox", ["sleep", "600"], detach=True)
    found = {k for k, _ in (tuple(i.split(" ", 1)) for i in lab.cleanup(dry_run=True).facts["found"])}
    assert {"cgroup", "grading"} <= {k.split()[0] for k in found}, found
    lab.cleanup()
    assert kernel.wait(timeout=10) != 0, "the kernel was killed with its cgroup"
    assert not os.path.exists(box.scratch)
    assert not [i for i in lab.cleanup(dry_run=True).facts["found"] if box.name in i]
    box.close()  # and the grader's own undo, if it comes back, finds nothing to fail on


@pytest.fixture
def victim():
    """A file of root's that the student would like to own or to have root run."""
    import tempfile
    d = tempfile.mkdtemp(prefix="labkit-test-victim-", dir="/srv" if os.path.isdir("/srv") else "/opt")
    path = os.path.join(d, "victim.py")
    with open(path, "w") as f:
        f.write("ROOT = 'untouched'\n")
    yield path
    import shutil
    shutil.rmtree(d)


def test_a_package_planted_in_scratch_is_never_imported_by_root(lab, victim):
    """The kernel starts in its scratch directory; `python -m` would put that first on root's path."""
    marker = victim + ".pwned"
    with Sandbox(lab, sandbox="container") as box:
        pkg = os.path.join(box.scratch, "labkit")
        os.mkdir(pkg)
        with open(os.path.join(pkg, "__init__.py"), "w") as f:
            f.write(f"import os\nopen({marker!r}, 'w').write(str(os.getuid()))\n")
        spec = json.dumps(box.kernel_spec([sys.executable, "-c", "print('kernel ran')"]).to_dict())
        subprocess.run([sys.executable, "-m", "labkit.agent.sandbox", spec], cwd=box.scratch,
                                capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        assert open(marker).read() == "0", "the attack: a naive launcher runs the student's package as root"
        os.unlink(marker)
        from labkit.course.sandbox import launcher
        res = subprocess.run(launcher() + [spec], cwd=box.scratch, capture_output=True, text=True)
        assert res.stdout.strip() == "kernel ran", res.stderr
        assert not os.path.exists(marker), "labkit's launcher imports labkit, not the student's"


def test_a_connection_file_swapped_for_a_symlink_gives_the_student_nothing(lab, victim):
    """Between kernel restarts the student may replace kernel.json with a link to a file of root's."""
    import stat as st_
    with Sandbox(lab, sandbox="container") as box:
        km = box.kernel_manager()
        km.write_connection_file()
        assert os.stat(km.connection_file).st_uid == box.uid
        os.unlink(km.connection_file)
        os.symlink(victim, km.connection_file)
        km.write_connection_file()  # what the restart does
        assert os.stat(victim).st_uid == 0 and open(victim).read() == "ROOT = 'untouched'\n"
        got = os.lstat(km.connection_file)
        assert st_.S_ISREG(got.st_mode) and got.st_uid == box.uid, "a fresh file, the student's to read"


@pytest.mark.slow
def test_a_vm_sandbox_is_a_guest_of_its_own_in_the_agents_cgroup_and_gone_after(lab):
    """--sandbox vm: the agent is a restored guest (its own kernel); its qemu sits in the sandbox's agent cgroup
    as a user of its own, and nothing of it is left after."""
    from labkit.agent import vm
    with Sandbox(lab, sandbox="vm") as box:
        assert box.info["sandbox"] == "vm" and box.info["accel"] in ("kvm", "tcg")
        assert box.lab.run(["uname", "-r"]).stdout.strip() != os.uname().release
        entry = next(e for e in vm.list_vms() if e.get("grading"))
        pid = int(entry["pid"])
        assert f"{box.name}-a" in open(f"/proc/{pid}/cgroup").read(), "qemu is held by the agent's limits"
        assert os.stat(f"/proc/{pid}").st_uid == box.uid + 100_000, "qemu runs as the slot's VM user"
    assert not os.path.exists(f"/proc/{pid}")
    assert not [e for e in vm.list_vms() if e["id"] == entry["id"]]
    assert not [i for i in lab.cleanup(dry_run=True).facts["found"] if box.name in i]
