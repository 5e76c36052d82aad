"""Transports fail with errors that say what to do; the sudo path works for a real unprivileged client."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import labkit
from labkit import transport as T
from labkit.errors import AgentTooOld, InvalidSpec, PrivilegeError, TransportError

from conftest import REPO, STUDENT

pytestmark = pytest.mark.privileged


def test_unknown_target_is_refused():
    with pytest.raises(InvalidSpec, match="unknown target"):
        labkit.connect("floppy://a")


def test_ssh_to_a_closed_port_says_how_to_check():
    with pytest.raises(TransportError) as err:
        labkit.connect("ssh://nobody@127.0.0.1:1", key_filename="/nonexistent", connect_timeout=3)
    assert "127.0.0.1:1" in str(err.value) and "ssh -p 1" in err.value.fix


def test_ssh_with_a_wrong_key_is_refused(sshd, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    with pytest.raises(TransportError, match="Authentication"):
        labkit.connect(f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}", key_filename=str(tmp_path / "k"))


def test_sudo_without_rights_is_a_privilege_error(student):
    os.rename("/etc/sudoers.d/labkit-test", "/etc/sudoers.d/.labkit-test-off")
    try:
        with pytest.raises(PrivilegeError) as err:
            T.sudo_transport(wrapper=["runuser", "-u", STUDENT, "--"])
        assert "NOPASSWD" in err.value.fix
    finally:
        os.rename("/etc/sudoers.d/.labkit-test-off", "/etc/sudoers.d/labkit-test")


def test_an_old_agent_is_refused(tmp_path):
    # Stand-in for an agent from an older labkit release (none is installed here): it says hello with protocol 0.
    old = tmp_path / "old_agent.py"
    old.write_text('import json,sys\nprint(json.dumps({"hello":"labkit-agent","protocol":0,"version":"0.0.1"}),'
                   ' flush=True)\nsys.stdin.read()\n')
    with pytest.raises(AgentTooOld):
        T.Subprocess([sys.executable, str(old)])


def test_an_agent_that_dies_reports_its_stderr():
    with pytest.raises(TransportError, match="no such thing"):
        T.Subprocess([sys.executable, "-c", "import sys; sys.stderr.write('no such thing'); sys.exit(3)"])


def test_unprivileged_notebook_user_gets_sudo_automatically(student):
    """The whole client runs as the student (system python3, stdlib only); 'auto' picks sudo."""
    d = tempfile.mkdtemp(prefix="labkit-client-")
    try:
        shutil.copytree(os.path.join(REPO, "labkit"), os.path.join(d, "labkit"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        os.chmod(d, 0o755)
        code = ("import sys, json; sys.path.insert(0, %r); import labkit, os\n"
                "lab = labkit.connect('auto')\n"
                "r = lab.run_in(['id', '-u'], ['uts'], hostname='mine')\n"
                "print(json.dumps({'uid': os.getuid(), 'target': lab.target, 'agent_euid': lab.info['euid'],"
                " 'inside': r.stdout.strip()}))\n" % d)
        res = subprocess.run(["runuser", "-u", STUDENT, "--", "/usr/bin/python3", "-c", code],
                             capture_output=True, text=True, timeout=120, cwd="/")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["uid"] != 0 and out["target"] == "sudo" and out["agent_euid"] == 0 and out["inside"] == "0"
    finally:
        shutil.rmtree(d)
