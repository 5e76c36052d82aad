"""The lab VM: the Vagrantfile validates, `vagrant ssh-config` is read right, and (the VM tier) a real
`vagrant up` provisions a Debian 12 guest whose pure cgroup v2 kernel runs the agent and a notebook."""
import grp
import os
import stat
import sys
import subprocess

import pytest

from labkit.client import vagrant
from labkit.wire.errors import TransportError

from conftest import REPO

SSH_CONFIG = """==> default: Vagrant has detected a plugin update; run `vagrant plugin update`.
Host default
  HostName 192.168.121.57
  User vagrant
  Port 22
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no
  IdentityFile "/home/me/labkit/vagrant/.vagrant/machines/default/libvirt/private_key"
  IdentitiesOnly yes
  LogLevel FATAL

"""


def test_ssh_config_is_parsed_despite_noise():
    cfg = vagrant.parse_ssh_config(SSH_CONFIG)
    assert cfg == {"Host": "default", "HostName": "192.168.121.57", "User": "vagrant", "Port": "22",
                   "IdentityFile": "/home/me/labkit/vagrant/.vagrant/machines/default/libvirt/private_key"}
    assert vagrant.parse_ssh_config("") == {}


def _fake_vagrant(tmp_path, out, code):
    # Stand-in for the `vagrant` command's answers when the VM is down (no VM runs in this test).
    script = tmp_path / "vagrant"
    script.write_text(f"#!/bin/sh\ncat <<'X'\n{out}\nX\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return [str(script)]


def test_a_vm_that_is_down_names_the_command_to_run(tmp_path):
    down = ("The provider for this Vagrant-managed machine is reporting that it\n"
            "is not yet ready for SSH. Depending on your provider this can carry\ndifferent meanings.")
    with pytest.raises(TransportError) as err:
        vagrant.ssh_config(str(tmp_path), vagrant_cmd=_fake_vagrant(tmp_path, down, 1))
    assert "vagrant up" in err.value.fix
    with pytest.raises(TransportError) as err:
        vagrant.ssh_config(str(tmp_path), vagrant_cmd=["/nonexistent/vagrant"])
    assert "install Vagrant" in err.value.fix
    # a fresh port after `vagrant reload` is read again on the next connect
    moved = SSH_CONFIG.replace("Port 22", "Port 2200")
    assert vagrant.ssh_config(str(tmp_path), vagrant_cmd=_fake_vagrant(tmp_path, moved, 0))["Port"] == "2200"


@pytest.mark.skipif(not os.path.exists("/usr/bin/vagrant"), reason="vagrant is not installed")
def test_vagrantfile_validates_and_refuses_bad_settings():
    vdir = os.path.join(REPO, "vagrant")
    env = dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_DOTFILE_PATH="/tmp/labkit-validate-dot")
    ok = subprocess.run(["vagrant", "validate"], cwd=vdir, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for k, v, said in [("LABKIT_VM_MEMORY", "512", "too little"), ("LABKIT_VM_OS", "windows", "not one of"),
                       ("LABKIT_VM_CPUS", "two", "whole number")]:
        bad = subprocess.run(["vagrant", "validate"], cwd=vdir, env=dict(env, **{k: v}), capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode != 0 and said in bad.stdout + bad.stderr, (k, bad.stdout + bad.stderr)
    subprocess.run(["rm", "-rf", "/tmp/labkit-validate-dot"])


def test_gitattributes_keep_scripts_lf():
    text = open(os.path.join(REPO, ".gitattributes")).read()
    assert "*.sh" in text and "eol=lf" in text and "Vagrantfile" in text


@pytest.mark.privileged
def test_provision_makes_a_random_jupyter_token_once(tmp_path):
    """provision.sh's token step, run on its own with its paths moved to a temporary folder: a random
    token, root and the user's group only, no newline (jupyter reads the file whole), kept on the next
    provision, replaced when it is not a token; and no fixed token in the VM's files."""
    vdir = os.path.join(REPO, "vagrant")
    text = open(os.path.join(vdir, "provision.sh")).read()
    for name in ("provision.sh", "Vagrantfile"):
        body = open(os.path.join(vdir, name)).read()
        assert "token=labkit" not in body and "IdentityProvider.token" not in body, name
    assert "JUPYTER_TOKEN_FILE=$token_file" in text
    start = text.index("  token_file=/etc/labkit/jupyter-token\n")
    end = text.index('  mv -f "$tmp" "$token_file"\n', start) + len('  mv -f "$tmp" "$token_file"\n')
    step = text[start:end].replace("/etc/labkit", str(tmp_path / "etc"))
    script = tmp_path / "step.sh"
    script.write_text("set -euo pipefail\nuser=nobody\n" + step)
    path = tmp_path / "etc" / "jupyter-token"
    tokens = []
    for _ in range(2):
        subprocess.run(["bash", str(script)], check=True, capture_output=True)
        st = path.stat()
        assert oct(st.st_mode & 0o777) == "0o640" and st.st_uid == 0
        assert grp.getgrgid(st.st_gid).gr_name == subprocess.run(["id", "-gn", "nobody"], capture_output=True,
                                                                   text=True).stdout.strip()
        tokens.append(path.read_text())
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 40 and "\n" not in tokens[0]
    path.write_text("labkit\n")
    subprocess.run(["bash", str(script)], check=True, capture_output=True)
    assert path.read_text() not in ("labkit\n", tokens[0]) and len(path.read_text()) >= 40


# --- the VM tier: a real `vagrant up` -----------------------------------------------------------

@pytest.mark.vm
def test_second_provision_is_idempotent_and_self_tests(vm_tier):
    res = vm_tier.vagrant("provision", *vm_tier.lab_machine(), timeout=900)
    out = res.stdout + res.stderr
    assert "self-test (labkit doctor)" in out
    assert "installing" not in out.split("self-test")[0], "a second provision must find everything installed"
    line = [ln for ln in out.splitlines() if " cgroups " in f" {ln.split(':', 1)[-1]} "][0]
    assert " v2 " in line and " ok " in line, line


@pytest.mark.vm
def test_guest_is_a_pure_cgroup_v2_kernel_of_its_own(vm_lab, lab):
    rep = vm_lab.doctor()
    assert rep["cgroups"]["value"] == "v2", rep.text()
    assert rep["namespaces"]["status"] == "ok"
    assert rep["kvm"]["status"] != "missing"
    guest_kernel = vm_lab.read_file("/proc/sys/kernel/osrelease")["text"].strip()
    host_kernel = lab.read_file("/proc/sys/kernel/osrelease")["text"].strip()
    assert guest_kernel != host_kernel, "a VM boots a kernel of its own"
    assert vm_lab.info["euid"] == 0 and vm_lab.target == "vagrant"


@pytest.mark.vm
@pytest.mark.slow
def test_a_notebook_scores_the_same_on_the_guest(vm_tier, tmp_path):
    from labkit.course.runbook import run_notebooks
    name = "02-namespaces.ipynb"
    [local] = [r.scores for r in run_notebooks("local", str(tmp_path / "local"), [name])]
    [guest] = [r.scores for r in run_notebooks("vagrant", str(tmp_path / "guest"), [name])]
    strip = lambda scores: [(s["question"], s["points"], s["passed"]) for s in scores]  # noqa: E731
    assert strip(guest) == strip(local)
    assert guest[-1]["points"] == guest[-1]["max_points"] > 0


@pytest.mark.vm
def test_a_vm_that_was_never_created_says_vagrant_up(vm_tier, tmp_path):
    import vmtier
    # the real `vagrant`, pointed at an empty state folder: as if `vagrant up` never ran
    cmd = ["env", f"VAGRANT_DOTFILE_PATH={tmp_path}", "ip", "netns", "exec", vmtier.NETNS, "vagrant"]
    with pytest.raises(TransportError) as err:
        vagrant.ssh_config(vagrant_cmd=cmd)
    assert "vagrant up" in err.value.fix, str(err.value)


def test_provision_gives_students_the_student_editions_and_keeps_their_work(tmp_path):
    """provision.sh's course step, run on its own for a real unprivileged user whose home is a temporary
    folder: the student editions (no solutions) in ~/labkit-course, owned by that user; a notebook the
    student changed stays as it is on the next provision, a missing one comes back; JupyterLab opens there."""
    text = open(os.path.join(REPO, "vagrant", "provision.sh")).read()
    assert "WorkingDirectory=$course\n" in text
    start = text.index("  course=$(getent passwd")
    end = text.index("  echo \"provision.sh: the student editions are in", start)
    import pathlib
    import shutil
    import tempfile
    home = pathlib.Path(tempfile.mkdtemp(prefix="lk-home-"))  # pytest's own folders are root's only
    try:
        _course_step(text, start, end, home, tmp_path)
    finally:
        shutil.rmtree(home)


def _course_step(text, start, end, home, tmp_path):
    import pwd
    nobody = pwd.getpwnam("nobody")
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    step = text[start:end].replace("$(getent passwd \"$user\" | cut -d: -f6)", str(home))
    script = tmp_path / "step.sh"
    script.write_text(f"set -euo pipefail\nuser=nobody\nrepo={REPO}\nvenv={os.path.dirname(os.path.dirname(sys.executable))}\n" + step)
    subprocess.run(["bash", str(script)], check=True, capture_output=True)
    course = home / "labkit-course"
    made = sorted(p.name for p in course.iterdir())
    assert made[0] == "00-setup.ipynb" and len(made) == len([f for f in os.listdir(os.path.join(REPO, "notebooks"))
                                                              if f.endswith(".ipynb")])
    assert (course / "01-chroot.ipynb").stat().st_uid == nobody.pw_uid
    assert "BEGIN SOLUTION" not in (course / "02-namespaces.ipynb").read_text()
    (course / "02-namespaces.ipynb").write_text("the student's work")
    (course / "03-cgroups.ipynb").unlink()
    subprocess.run(["bash", str(script)], check=True, capture_output=True)
    assert (course / "02-namespaces.ipynb").read_text() == "the student's work"
    assert (course / "03-cgroups.ipynb").exists()
