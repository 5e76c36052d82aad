"""The repository's promises: same dependencies in pyproject and environment.yml, README's two
commands, .ci/run calling the README's test command, an agent that needs only the standard library."""
import ast
import os
import re
import sys
import zipfile
import io

import yaml

from labkit import transport

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


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    readme = open(os.path.join(REPO, "README.md")).read()
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "sudo bash scripts/lab.sh" in readme and "sudo bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in ci


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
