"""Named volumes (labkit.agent.volumes) for real: made by the first container that names one, kept across rm
while the writable layer goes, refused removal while in use, listed and removed from the CLI, removed by
cleanup. Refusals as attacks: names that climb or hide (``../etc``, ``a/b``, ``.x``), a volume name where only host
paths are allowed (a process spec), and a container that leaves a link to a host file for the lab's check."""
import json
import os
import subprocess
import sys

import pytest

from labkit.agent import cleanup as agent_cleanup
from labkit.agent import volumes
from labkit.course import checks
from labkit.wire.errors import Conflict, InvalidSpec
from labkit.wire.specs import ContainerSpec, ProcessSpec

from conftest import REPO

pytestmark = pytest.mark.privileged


@pytest.fixture
def name():
    n = "notes-t" + os.urandom(3).hex()
    yield n
    if n in [v["name"] for v in volumes.list_volumes()]:
        volumes.remove(n, force=True)


def _run(lab, argv, vol):
    c = lab.create("busybox", ["sh", "-c", argv], volumes=[f"{vol}:/data"], network=None)
    c.start()
    c.wait(30)
    out = c.logs()
    return c, out


def test_a_volume_outlives_its_containers_and_the_writable_layer_does_not(lab, name):
    me = name[len("notes-"):]
    writer, _ = _run(lab, f"echo {me} > /data/note.txt; echo draft > /tmp/scratch.txt", name)
    row = lab.call("volume.inspect", name=name)
    assert row["used_by"] == [writer.name] and row["mountpoint"] == f"{volumes.VOLUMES}/{name}/_data"
    with pytest.raises(Conflict) as err:
        lab.volume_rm(name)
    assert writer.name in str(err.value) and "remove those containers first" in err.value.fix
    writer.rm()
    reader, out = _run(lab, "cat /data/note.txt /tmp/scratch.txt", name)
    reader.rm()
    assert me in out and "can't open '/tmp/scratch.txt'" in out
    assert checks.volume_kept(lab, name)[0] is True
    assert lab.call("volume.inspect", name=name)["files"] == [{"name": "note.txt", "kind": "file", "size": len(me) + 1}]
    lab.volume_rm(name)
    assert name not in [v["name"] for v in lab.volumes()] and not os.path.exists(f"{volumes.VOLUMES}/{name}")


def test_a_link_left_in_a_volume_is_never_followed_by_the_check(lab, name):
    c, _ = _run(lab, "ln -s /etc/shadow /data/note.txt", name)
    c.rm()
    files = lab.call("volume.inspect", name=name)["files"]
    assert files == [{"name": "note.txt", "kind": "symlink", "size": len("/etc/shadow")}]
    score, feedback = checks.volume_kept(lab, name)
    assert score == 0.4 and "root:" not in feedback


@pytest.mark.parametrize("bad", ["../etc", "a/b", ".x", "-x", "x" * 65, "", "no\nline"])
def test_names_that_climb_or_hide_are_refused(lab, bad):
    with pytest.raises(InvalidSpec):
        volumes.create(bad)
    with pytest.raises(InvalidSpec):
        ContainerSpec(image="busybox", binds=(f"{bad}:/data",) if bad else ((bad, "/data", False),))
    assert not os.path.exists(os.path.join(volumes.VOLUMES, "..", "etc", "_data"))


def test_only_a_container_may_name_a_volume():
    with pytest.raises(InvalidSpec, match="absolute"):
        ProcessSpec(argv=("true",), namespaces=("mnt",), rootfs="/var/lib/labkit/rootfs/x", binds=(("notes", "/d"),))
    assert ContainerSpec(image="busybox", binds=("notes:/data:ro",)).binds == (("notes", "/data", True),)


def test_the_cli_and_cleanup(lab, name):
    cli = [sys.executable, "-m", "labkit.cli"]
    env = dict(os.environ, LABKIT_DAEMON="off")
    made = subprocess.run(cli + ["volume", "create", name], capture_output=True, text=True, cwd=REPO, env=env)
    assert made.returncode == 0 and made.stdout.strip() == name, made.stderr
    ls = subprocess.run(cli + ["volume", "ls"], capture_output=True, text=True, cwd=REPO, env=env).stdout
    assert "VOLUME NAME" in ls and name in ls
    info = json.loads(subprocess.run(cli + ["volume", "inspect", name], capture_output=True, text=True, cwd=REPO,
                                     env=env).stdout)
    assert info["driver"] == "local" and info["used_by"] == []
    assert ("volume", name) in agent_cleanup.plan()
    assert f"volume {name}" in lab.cleanup()["removed"]
    assert name not in [v["name"] for v in volumes.list_volumes()]


def test_a_create_refused_for_its_name_makes_no_volume(lab, name):
    c = lab.create("busybox", ["true"], name="t-vol-taken", network=None)
    try:
        with pytest.raises(Conflict):
            lab.create("busybox", ["true"], name="t-vol-taken", volumes=[f"{name}:/data"], network=None)
        assert name not in [v["name"] for v in lab.volumes()]
    finally:
        c.rm()
