"""The repository's promises: same dependencies in pyproject and environment.yml, README's two
commands (both run by .ci/run, the lab command first), scripts that work for root with or without sudo, an agent that needs only the standard library."""
import ast
import os
import shutil
import re
import sys
import zipfile
import io

import pytest
import yaml

from labkit.client import transport

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _norm(req):
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    deps = dict(_norm(d) for d in _pyproject()["project"]["dependencies"])
    with open(os.path.join(REPO, "environment.yml")) as f:
        env = yaml.safe_load(f)
    conda = dict(_norm(d) for d in env["dependencies"] if isinstance(d, str) and not d.startswith(("python", "pip")))
    assert conda == deps


def test_readme_has_two_setup_commands_and_ci_runs_both():
    readme = open(os.path.join(REPO, "README.md")).read()
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    blocks = re.findall(r"```\n(.*?)\n```", readme, re.S)
    assert "bash scripts/lab.sh" in blocks and "bash scripts/test.sh" in blocks, "the two commands, each a block"
    runs = [ln.strip() for ln in ci.splitlines() if not ln.lstrip().startswith("#")]
    lab, test = runs.index("bash scripts/lab.sh"), runs.index("bash scripts/test.sh")
    assert lab < test, "the lab command runs first, on a machine the test command has not prepared"
    assert "labkit scores lab-output --all --require-full" in ci


def test_scripts_become_root_through_one_helper():
    for name in ("lab.sh", "test.sh", "setup.sh"):
        text = open(os.path.join(REPO, "scripts", name)).read()
        assert '. "$here/scripts/as-root.sh"' in text, name
        assert not re.search(r"^\s*(exec )?sudo ", text, re.M), f"{name} must not call sudo itself"


@pytest.mark.privileged
def test_as_root_runs_for_root_without_sudo_and_asks_sudo_for_a_user(student):
    """A fresh Debian machine has no sudo: a root shell goes straight on; a user with sudo is lifted to root
    through it; a user without sudo is told how to run it as root."""
    import subprocess
    import tempfile
    d = tempfile.mkdtemp(prefix="labkit-asroot-")  # readable by the user (pytest's tmp_path is root's only)
    os.chmod(d, 0o755)
    shutil.copy(os.path.join(REPO, "scripts", "as-root.sh"), d)
    script = os.path.join(d, "probe.sh")
    with open(script, "w") as f:
        f.write(f'. "{d}/as-root.sh"\necho "uid=$(id -u) args=$*"\n')
    request_cleanup = lambda: shutil.rmtree(d, ignore_errors=True)  # noqa: E731
    as_root = subprocess.run(["env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "bash", str(script), "a b"],
                             capture_output=True, text=True)
    assert as_root.stdout.strip() == "uid=0 args=a b", as_root.stderr
    user = ["runuser", "-u", student.pw_name, "--", "env"]
    lifted = subprocess.run(user + ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "bash", str(script), "a b"],
                            capture_output=True, text=True)
    assert lifted.stdout.strip() == "uid=0 args=a b", lifted.stderr
    nosudo = os.path.join(d, "bin")
    os.mkdir(nosudo)
    for tool in ("bash", "id", "basename"):
        os.symlink(shutil.which(tool), os.path.join(nosudo, tool))
    try:
        refused = subprocess.run(user + [f"PATH={nosudo}", "bash", str(script)], capture_output=True, text=True)
        assert refused.returncode == 1 and "run it as root" in refused.stderr and "uid=" not in refused.stdout
    finally:
        request_cleanup()


def test_agent_imports_only_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"labkit"}
    data = transport.agent_zipapp_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in z.namelist():
            tree = ast.parse(z.read(name))
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module]
                for m in mods:
                    assert m.split(".")[0] in allowed, f"{name} imports {m}: the agent must stay stdlib-only"


def test_agent_zipapp_is_deterministic():
    assert transport.agent_zipapp_bytes() == transport.agent_zipapp_bytes()


def test_agent_parses_as_python_3_9():
    """The agent runs on a target's system python3, which may be as old as 3.9."""
    data = transport.agent_zipapp_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in z.namelist():
            ast.parse(z.read(name), filename=name, feature_version=(3, 9))


def test_the_lab_vm_box_carries_everything_provision_installs():
    """The VM tier's guest has no way out to a mirror: its box must hold every package provision.sh asks
    for, or `vagrant up` fails in CI (as it did when crun and runc joined the list)."""
    import vmtier
    text = open(os.path.join(REPO, "vagrant", "provision.sh")).read()
    body = re.search(r"^pkgs=\((.*?)\)", text, re.S | re.M).group(1)
    wanted = {w for w in body.split() if not w.startswith("$")} | {"qemu-system-x86"}
    assert wanted - set(vmtier.BOX_PACKAGES) == set()
