"""Transports fail with errors that say what to do; the sudo path works for a real unprivileged client;
SSH talks only to a server whose host key it trusts (known hosts, a pinned fingerprint, or the lab VM's
key stored on first use), against a real sshd and a second one with another host key."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import labkit
from labkit.client import transport as T
from labkit.client import vagrant
from labkit.wire.errors import AgentTooOld, InvalidSpec, PrivilegeError, TransportError

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
        labkit.connect(f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}", key_filename=str(tmp_path / "k"),
                       known_hosts=sshd["known_hosts"])


def test_sudo_without_rights_is_a_privilege_error(student):
    os.rename("/etc/sudoers.d/labkit-test", "/etc/sudoers.d/.labkit-test-off")
    try:
        with pytest.raises(PrivilegeError) as err:
            T.sudo_transport(wrapper=["runuser", "-u", STUDENT, "--"])
        assert "NOPASSWD" in err.value.fix and "root" in err.value.fix.split("NOPASSWD")[0], \
            "the fix says plainly that this rule means root"
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


# --- SSH host keys ---------------------------------------------------------------------------------

@pytest.fixture
def own_home(tmp_path, monkeypatch):
    """This test's ~ (an empty ~/.ssh) and ~/.config: the real user's known hosts and labkit's stored keys
    stay out of it, and are not written."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for k in ("VAGRANT_CWD", "VAGRANT_DOTFILE_PATH", "LABKIT_VAGRANT_NETNS", "LABKIT_VM_JUPYTER"):
        monkeypatch.delenv(k, raising=False)
    return home


def _client(server, **kw):
    """Log in to ``server`` with paramiko (the host key checked), and log out again; the check's verdict."""
    client, check = T.ssh_client(server["host"], server["port"], user=server["user"], key_filename=server["key"],
                                 connect_timeout=10, **kw)
    client.close()
    return check.accepted


def test_an_unknown_host_key_is_refused_with_its_fingerprint(sshd, own_home):
    with pytest.raises(T.UnknownHostKey) as err:
        labkit.connect(f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}", key_filename=sshd["key"])
    e = err.value
    assert isinstance(e, TransportError)
    assert f"127.0.0.1:{sshd['port']}" in e.message and sshd["key_type"] in e.message
    assert sshd["fingerprint"] in e.message and sshd["fingerprint"] in e.fix
    assert f"ssh-keyscan -p {sshd['port']} -t ed25519 127.0.0.1 >> ~/.ssh/known_hosts" in e.fix
    assert f"host_key='{sshd['fingerprint']}'" in e.fix
    assert not (own_home / ".ssh" / "known_hosts").exists(), "nothing is added to known_hosts by itself"


def test_a_known_host_key_is_accepted(sshd, own_home):
    """From an explicit known_hosts file (the whole transport, agent and all), from ~/.ssh/known_hosts with
    hashed names as `ssh-keyscan -H` writes them, and pinned by fingerprint."""
    lab = labkit.connect(f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}", key_filename=sshd["key"],
                         known_hosts=sshd["known_hosts"])
    try:
        assert lab.transport.host_key == {"type": sshd["key_type"], "fingerprint": sshd["fingerprint"],
                                          "by": sshd["known_hosts"]}
        assert lab.run(["id", "-u"]).stdout.strip() == "0"
    finally:
        lab.close()
    mine = own_home / ".ssh" / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(own_home / "other")], check=True)
    other = " ".join((own_home / "other.pub").read_text().split()[:2])
    mine.write_text(f"[127.0.0.1]:1 {other}\n127.0.0.1 {other}\n" + open(sshd["known_hosts"]).read())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(mine)], check=True, capture_output=True)
    assert f"[127.0.0.1]:{sshd['port']}" not in mine.read_text(), "the names are hashed now"
    with open(mine, "a") as f:  # lines OpenSSH skips are skipped, not fatal
        f.write("# a comment\nnot a key line\n@cert-authority * ssh-ed25519 AAAA\n[127.0.0.1]:* ssh-ed25519 !!!\n")
    assert _client(sshd)["by"] == str(mine)
    assert _client(sshd, host_key=sshd["fingerprint"])["fingerprint"] == sshd["fingerprint"]


def test_a_changed_host_key_is_refused(sshd, sshd_rekeyed, own_home, tmp_path):
    """The client trusts the first server's key for the second server's address: another key answers there."""
    kh = tmp_path / "known_hosts"
    kh.write_text(open(sshd["known_hosts"]).read().replace(f":{sshd['port']} ", f":{sshd_rekeyed['port']} "))
    with pytest.raises(T.HostKeyChanged) as err:
        labkit.connect(f"ssh://{sshd_rekeyed['user']}@127.0.0.1:{sshd_rekeyed['port']}",
                       key_filename=sshd_rekeyed["key"], known_hosts=str(kh))
    e = err.value
    assert "CHANGED" in e.message and sshd_rekeyed["fingerprint"] in e.message and sshd["fingerprint"] in e.message
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd_rekeyed['port']}' -f {kh}" in e.fix
    # the same key in ~/.ssh/known_hosts (the user's own file) and a pinned fingerprint: refused alike
    (own_home / ".ssh" / "known_hosts").write_text(kh.read_text())
    with pytest.raises(T.HostKeyChanged):
        _client(sshd_rekeyed)
    with pytest.raises(T.HostKeyChanged):
        _client(sshd_rekeyed, host_key=sshd["fingerprint"])
    # only a key of another type is trusted for it (an RSA key): the client asks for that type, gets none
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(tmp_path / "rsa")], check=True)
    rsa = (tmp_path / "rsa.pub").read_text().split()[:2]
    (tmp_path / "rsa_known").write_text(f"[127.0.0.1]:{sshd['port']} {rsa[0]} {rsa[1]}\n")
    with pytest.raises(T.HostKeyChanged, match="no host key of the type trusted"):
        _client(sshd, known_hosts=str(tmp_path / "rsa_known"))
    # a key marked @revoked is refused even where a plain line trusts it
    revoked = tmp_path / "revoked"
    revoked.write_text(open(sshd["known_hosts"]).read() + "@revoked " + open(sshd["known_hosts"]).read())
    with pytest.raises(T.HostKeyChanged, match="revoked"):
        _client(sshd, known_hosts=str(revoked))


def test_bad_host_key_options_are_refused(sshd, own_home):
    with pytest.raises(InvalidSpec, match="fingerprint"):
        _client(sshd, host_key="MD5:aa:bb")
    with pytest.raises(InvalidSpec, match="does not exist"):
        _client(sshd, known_hosts="/nonexistent/known_hosts")


def _fake_vm(tmp_path, server, machine_id="5f0c9d4e-labkit-test-vm"):
    """A Vagrant project whose VM is ``server``: `vagrant ssh-config` answers as Vagrant does (host key
    checks off, for its own ssh), `vagrant port` names the forwarded JupyterLab port, and .vagrant holds
    the machine id. A stand-in for the `vagrant` command: no VM runs in these tests."""
    vm = tmp_path / "vm"
    (vm / ".vagrant" / "machines" / "default" / "libvirt").mkdir(parents=True, exist_ok=True)
    (vm / ".vagrant" / "machines" / "default" / "libvirt" / "id").write_text(machine_id)
    (vm / "port").write_text(str(server["port"]))
    script = vm / "vagrant"
    script.write_text(f"""#!/bin/sh
if [ "$1" = port ]; then echo 18888; exit 0; fi
cat <<X
Host default
  HostName 127.0.0.1
  User {server['user']}
  Port $(cat {vm}/port)
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no
  IdentityFile "{server['key']}"
  IdentitiesOnly yes
  LogLevel FATAL
X
""")
    script.chmod(0o755)
    return vm, [str(script)]


def test_the_lab_vm_key_is_trusted_on_first_use_then_checked(sshd, sshd_rekeyed, own_home, tmp_path):
    vm, cmd = _fake_vm(tmp_path, sshd)
    store = own_home / ".config" / "labkit" / "known_hosts" / "5f0c9d4e-labkit-test-vm"
    lab = labkit.connect("vagrant", directory=str(vm), vagrant_cmd=cmd)
    try:
        assert lab.transport.host_key["by"] == f"first use: stored now in {store}"
        assert lab.run(["id", "-u"]).stdout.strip() == "0"
    finally:
        lab.close()
    assert oct(store.stat().st_mode & 0o777) == "0o600" and oct(store.parent.stat().st_mode & 0o777) == "0o700"
    kind, blob = open(sshd["host_key"]).read().split()[:2]
    assert f"{kind} {blob}" in store.read_text()
    # the next connect checks the stored key (vagrant's StrictHostKeyChecking no is not obeyed)
    lab = labkit.connect("vagrant", directory=str(vm), vagrant_cmd=cmd)
    lab.close()
    assert lab.transport.host_key["by"] == f"stored on first use in {store}"
    # another key where the VM answers (its port now leads to the second server): refused, the store kept
    (vm / "port").write_text(str(sshd_rekeyed["port"]))
    before = store.read_text()
    with pytest.raises(T.HostKeyChanged) as err:
        labkit.connect("vagrant", directory=str(vm), vagrant_cmd=cmd)
    e = err.value
    assert "the lab VM 'default'" in e.message and sshd_rekeyed["fingerprint"] in e.message
    assert sshd["fingerprint"] in e.message
    assert "vagrant destroy" in e.fix and f"rm {store}" in e.fix
    assert store.read_text() == before
    # the documented way out when the VM was re-keyed on purpose: delete the file it names, connect again
    store.unlink()
    assert _client_vm(vm, cmd)["by"].startswith("first use")
    assert _client_vm(vm, cmd) == {"type": sshd_rekeyed["key_type"], "fingerprint": sshd_rekeyed["fingerprint"],
                                   "by": f"stored on first use in {store}"}


def _client_vm(vm, cmd):
    """The lab VM's host key verdict, without starting the agent (the SSH login of jupyter_url's path)."""
    opts = vagrant._ssh_options(str(vm), cmd, None)
    client, check = T.ssh_client(opts.pop("host"), **opts)
    client.close()
    return check.accepted


def test_a_recreated_lab_vm_is_trusted_afresh(sshd, sshd_rekeyed, own_home, tmp_path):
    """`vagrant destroy` + `vagrant up` gives the VM a new machine id: its new key is stored, nothing to do."""
    vm, cmd = _fake_vm(tmp_path, sshd, machine_id="first-vm")
    assert _client_vm(vm, cmd)["fingerprint"] == sshd["fingerprint"]
    (vm / "port").write_text(str(sshd_rekeyed["port"]))
    with pytest.raises(T.HostKeyChanged):
        _client_vm(vm, cmd)
    _fake_vm(tmp_path, sshd_rekeyed, machine_id="second-vm")
    assert _client_vm(vm, cmd)["by"].startswith("first use")
    stored = sorted(os.listdir(own_home / ".config" / "labkit" / "known_hosts"))
    assert stored == ["first-vm", "second-vm"]


def test_jupyter_url_reads_the_vm_token_over_checked_ssh(sshd, own_home, tmp_path):
    d = tempfile.mkdtemp(prefix="labkit-token-")  # the student (the SSH user) reads it, as vagrant does in the VM
    try:
        os.chmod(d, 0o755)
        token = "q3Jx7w_T0kenMadeAtRandom-0123456789abcdef"
        with open(os.path.join(d, "jupyter-token"), "w") as f:
            f.write(token)
        os.chmod(os.path.join(d, "jupyter-token"), 0o644)
        vm, cmd = _fake_vm(tmp_path, sshd)
        url = vagrant.jupyter_url(directory=str(vm), vagrant_cmd=cmd, token_file=os.path.join(d, "jupyter-token"))
        assert url == f"http://127.0.0.1:18888/lab?token={token}"
        with pytest.raises(TransportError) as err:
            vagrant.jupyter_url(directory=str(vm), vagrant_cmd=cmd, token_file=os.path.join(d, "missing"))
        assert "vagrant provision" in err.value.fix
    finally:
        shutil.rmtree(d)


def test_doctor_says_that_agent_access_is_root(request, student, sshd):
    from conftest import open_lab
    for kind, said in (("sudo", f"root via sudo ({STUDENT})"), ("ssh", f"root via ssh + sudo ({STUDENT})")):
        lab = open_lab(kind, request)
        try:
            line = lab.doctor()["agent access"]
        finally:
            lab.close()
        assert line["status"] == "ok" and line["value"] == said, line
        assert line["detail"].startswith("agent access is root here"), line

