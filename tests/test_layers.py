"""The layers in labkit's tree, read from the imports: the data flows one way.

    wire    (errors, protocol, specs, arch, channel)   imports nothing of labkit but itself
    agent   (root, standard library only)               imports the wire
    client  (connect, Lab, handles, transports)         imports the wire
    course  (checks, grading, isolation, bench, ...)    imports the wire and the client
    front   (labkit/__init__.py, __main__.py, cli.py)   puts them together; of the agent it may import
                                                        only labkit.agent.local (the in-process channel)

Every import counts, also those inside functions (a lazy import is still an edge).
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "labkit")

ALLOWED = {
    "wire": {"wire"},
    "agent": {"wire", "agent"},
    "client": {"wire", "client"},
    "course": {"wire", "client", "course"},
    "front": {"wire", "client", "course", "front"},
}
FRONT_MAY_IMPORT = {"labkit.agent.local"}


def _modules(root):
    """{dotted module name: path} for every .py under ``root`` (a package named after its folder)."""
    base = os.path.dirname(root)
    out = {}
    for d, _, files in os.walk(root):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(d, fn)
                rel = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(name, path, known):
    """The labkit modules that module ``name`` imports (anywhere in it), as (target, line)."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top = name.split(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == top]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != top:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, node.lineno))
    return out


def layer_of(module):
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ("wire", "agent", "client", "course"):
        return parts[1]
    return "front"


def violations(root):
    """Every import that goes against the layers, as readable lines."""
    known = _modules(root)
    bad = []
    for name, path in sorted(known.items()):
        src = layer_of(name)
        for target, line in _imports(name, path, known):
            dst = layer_of(target)
            if src == "front" and dst == "agent":
                if target not in FRONT_MAY_IMPORT:
                    bad.append(f"{os.path.relpath(path, os.path.dirname(root))}:{line}: the front end imports "
                               f"{target} (only {', '.join(sorted(FRONT_MAY_IMPORT))} of the agent)")
            elif dst not in ALLOWED[src]:
                bad.append(f"{os.path.relpath(path, os.path.dirname(root))}:{line}: {src} imports {target} ({dst})")
    return bad


def test_labkit_imports_follow_the_layers():
    assert violations(PKG) == []


def test_the_tree_shows_the_layers():
    """Every module but the front ends lives in one of the four layer packages."""
    front = sorted(m for m in _modules(PKG) if layer_of(m) == "front")
    assert front == ["labkit", "labkit.__main__", "labkit.cli"]


@pytest.mark.parametrize("where,code,expect", [
    ("agent/x.py", "from ..client import lab\n", "agent imports labkit.client.lab (client)"),
    ("agent/x.py", "def f():\n    from ..course.checks import y\n", "agent imports labkit.course.checks (course)"),
    ("client/x.py", "from ..agent import engine\n", "client imports labkit.agent.engine (agent)"),
    ("client/x.py", "import labkit.course.bench\n", "client imports labkit.course.bench (course)"),
    ("wire/x.py", "from ..client.records import Record\n", "wire imports labkit.client.records (client)"),
    ("course/x.py", "from labkit.agent.workloads import PROBE_SH\n", "course imports labkit.agent.workloads (agent)"),
    ("cli.py", "from .agent import engine\n", "the front end imports labkit.agent.engine"),
    ("client/x.py", "from .. import connect\n", "client imports labkit (front)"),
])
def test_the_check_catches_each_wrong_edge(tmp_path, where, code, expect):
    """The checker run on a copy of the tree with one wrong import added finds exactly that one."""
    import shutil
    root = tmp_path / "labkit"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / where).write_text(code)
    found = violations(str(root))
    assert len(found) == 1 and expect in found[0], found


def test_one_exit_policy_for_every_handle():
    """Every live handle undoes in ``with`` and in ``Lab.release`` through its own ``_undo``; an undo that
    fails while the block is already failing is attached to that error, not raised over it."""
    from labkit.client import handles
    from labkit.client.lab import Lab
    from labkit.wire.errors import LabkitError, MechanismError
    kinds = [c for c in vars(handles).values() if isinstance(c, type) and issubclass(c, handles._Handle)
             and c is not handles._Handle]
    assert {c.__name__ for c in kinds} >= {"Rootfs", "Process", "Cgroup", "OverlayRoot", "Network", "Container",
                                          "VirtualMachine"}
    for cls in kinds:
        assert "__exit__" not in vars(cls), f"{cls.__name__} has an __exit__ of its own"
        assert "_undo" in vars(cls), f"{cls.__name__} has no undo"

    class Failing(handles._Handle):
        undone = 0

        def _undo(self):
            Failing.undone += 1
            raise MechanismError("could not remove it")

    with pytest.raises(ValueError) as err:
        with Failing():
            raise ValueError("the block's own error")
    assert "could not remove it" in " ".join(getattr(err.value, "__notes__", [])) or not hasattr(err.value, "add_note")
    with pytest.raises(MechanismError):
        with Failing():
            pass
    with pytest.raises(LabkitError):  # release goes on past one failure, then raises it
        Lab(transport=None).release(None, Failing(), Failing())
    assert Failing.undone == 4
