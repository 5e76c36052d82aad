"""Fixtures: real transports (in-process, sudo as a real unprivileged user, SSH to a real sshd on
127.0.0.1), and a leak check that fails the run when labkit left kernel objects behind."""
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import labkit
from labkit.client import transport as T
from labkit.agent.local import InProcess
from labkit.client.lab import Lab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEFTOVERS = os.path.join(os.path.dirname(REPO), "shared", "tools", "leftovers")
STUDENT = "lkstudent"
SUDOERS = "/etc/sudoers.d/labkit-test"
GECOS = "labkit test user"


def http_get(url, tries=60):
    """GET url from this machine, retrying while the server starts; the body as text."""
    import urllib.request
    for _ in range(tries):
        try:
            return urllib.request.urlopen(url, timeout=3).read().decode()
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"no answer from {url}")


class Tmux:
    """``argv`` typed in a real terminal: a detached tmux session ``cols`` x ``rows``, its screen read, keys
    typed into it, and the command's exit code (the shell that ran it writes it to a file). A context manager:
    the session and the file go at the end, however it ends."""

    def __init__(self, name, argv, cols=120, rows=30):
        import shlex
        if not shutil.which("tmux"):
            pytest.fail("tmux is missing: scripts/setup.sh --dev installs it")
        self.name = name
        fd, self.rc = tempfile.mkstemp(prefix="lk-tmux-rc-")
        os.close(fd)
        line = " ".join(shlex.quote(str(a)) for a in argv) + f"; echo $? > {self.rc}"
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(cols), "-y", str(rows), "sh", "-c", line],
                       check=True, cwd=REPO)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)
        if os.path.exists(self.rc):
            os.unlink(self.rc)

    def screen(self):
        """What the terminal shows (tmux drops the spaces at the ends of lines: a prompt "/ # " reads "/ #")."""
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True).stdout

    def until(self, text, seconds=30):
        deadline = time.monotonic() + seconds
        while text not in self.screen() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert text in self.screen(), f"{text!r} never showed; the terminal shows:\n{self.screen()}"

    def type(self, line):
        subprocess.run(["tmux", "send-keys", "-t", self.name, line, "Enter"], check=True)

    def prompt(self, text="/ #", seconds=30):
        """Enter until ``text`` shows: a client that attaches to a running shell says nothing until then, and
        keys typed before it has the terminal in raw mode are flushed (as the docker CLI's are)."""
        deadline = time.monotonic() + seconds
        while text not in self.screen() and time.monotonic() < deadline:
            self.keys("Enter")
            time.sleep(0.3)
        assert text in self.screen(), f"{text!r} never showed; the terminal shows:\n{self.screen()}"

    def keys(self, *keys):
        """Keys as tmux names them, e.g. "C-p", "C-q" (Ctrl-P, Ctrl-Q), no Enter."""
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def exit_code(self, seconds=30):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with open(self.rc) as f:
                said = f.read().strip()
            if said:
                return int(said)
            time.sleep(0.1)
        raise AssertionError(f"the command did not end; its terminal shows:\n{self.screen()}")


def oci_layout(d, layer, config, tag=None):
    """Write a one-layer OCI image layout at ``d`` (a pathlib.Path): the uncompressed ``layer`` tar (bytes), an
    image config around ``config`` (this CPU's architecture), a manifest and index.json (annotated ``tag``)."""
    import hashlib
    import json
    import platform
    (d / "blobs" / "sha256").mkdir(parents=True)

    def blob(data):
        h = hashlib.sha256(data).hexdigest()
        (d / "blobs" / "sha256" / h).write_bytes(data)
        return {"digest": "sha256:" + h, "size": len(data)}
    lay = blob(layer)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    cfg = blob(json.dumps({"architecture": arch, "os": "linux", "config": config,
                           "rootfs": {"type": "layers", "diff_ids": [lay["digest"]]}}).encode())
    man = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": dict(cfg, mediaType="application/vnd.oci.image.config.v1+json"),
                           "layers": [dict(lay, mediaType="application/vnd.oci.image.layer.v1.tar")]}).encode())
    entry = dict(man, mediaType="application/vnd.oci.image.manifest.v1+json")
    if tag:
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (d / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return str(d)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="privileged test: run the suite as root (sudo bash scripts/test.sh)")
        for item in items:
            if "privileged" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_leftovers():
    """After the whole suite, ../shared/tools/leftovers must print nothing, no labkit VM (qemu named
    labkit-vm-<id>) may run, and the VM tier must have left no qemu or libvirt process and no namespace."""
    yield
    if os.geteuid() != 0 or os.environ.get("LABKIT_TESTS_NESTED") == "1":
        return  # a session run by another test (tests/test_beside_docker.py): the outer session checks at its end
    import vmtier
    assert vmtier.leftovers() == [], "the VM tier left things behind"
    qemu = subprocess.run(["pgrep", "-af", "labkit-vm-"], capture_output=True, text=True).stdout.strip()
    assert qemu == "", "labkit left a VM running:\n" + qemu
    if os.path.exists(LEFTOVERS):
        out = subprocess.run(["bash", LEFTOVERS], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "", "labkit left kernel objects behind:\n" + out.stdout


def vm_tier_skipped():
    """The reason the VM tier does not run here, or None. CI always runs it; a developer may skip it."""
    if os.environ.get("LABKIT_SKIP_VM") == "1" and os.environ.get("CI") != "true":
        return "VM tier skipped by LABKIT_SKIP_VM=1 (CI always runs it)"
    if os.geteuid() != 0:
        return "the VM tier needs root"
    return None


@pytest.fixture(scope="session")
def vm_tier():
    """A real `vagrant up` of vagrant/Vagrantfile: Debian 12 guests on pure cgroup v2 (tests/vmtier.py), as
    LABKIT_VM_NODES=3 makes them: the lab VM ("manager", which every VM test but lab 09's cluster of VMs uses)
    and two workers."""
    reason = vm_tier_skipped()
    if reason:
        pytest.skip(reason)
    import vmtier
    with vmtier.Tier(nodes=3) as tier:
        yield tier


@pytest.fixture(scope="session")
def vm_lab(vm_tier):
    """A Lab on the guest, over the SSH transport exactly as a student's laptop reaches the lab VM."""
    lab = vm_tier.lab()
    yield lab
    lab.close()


@pytest.fixture(scope="session")
def student():
    """A real unprivileged user with passwordless sudo (as on a student's Linux laptop)."""
    try:
        ours = pwd.getpwnam(STUDENT).pw_gecos == GECOS  # left by an interrupted run: still ours
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", "-c", GECOS, STUDENT], check=True)
        ours = True
    subprocess.run(["usermod", "-p", "*", STUDENT], check=True)  # no password, but not locked (sshd)
    with open(SUDOERS, "w") as f:
        f.write(f"{STUDENT} ALL=(root) NOPASSWD: ALL\n")
    os.chmod(SUDOERS, 0o440)
    try:
        yield pwd.getpwnam(STUDENT)
    finally:
        os.unlink(SUDOERS)
        if ours:
            subprocess.run(["pkill", "-KILL", "-u", STUDENT], capture_output=True)
            time.sleep(0.2)
            res = subprocess.run(["userdel", "-r", STUDENT], capture_output=True, text=True)
            assert res.returncode in (0, 12), f"could not remove the test user: {res.stderr}"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sshd(d, client_pub):
    """Start a real OpenSSH server on 127.0.0.1 with a host key of its own (made in ``d``), accepting the
    client key ``client_pub`` for the student; yields its address, host key and a known_hosts file naming it."""
    sshd_bin = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin")
    if not sshd_bin:
        pytest.fail("sshd is missing: scripts/setup.sh --dev installs openssh-server")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    shutil.copy(client_pub, d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o644)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        f"PidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nAllowUsers {STUDENT}\nPermitRootLogin no\nLogLevel ERROR\n")
    # what a client that trusts this server has in its known_hosts: the host key, named [host]:port
    kind, blob = (d / "host_key.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {blob}\n")
    fp = subprocess.run(["ssh-keygen", "-lf", str(d / "host_key.pub")], check=True, capture_output=True,
                        text=True).stdout.split()[1]
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "wb"))
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("sshd did not start: " + (d / "sshd.log").read_text())
    try:
        yield {"host": "127.0.0.1", "port": port, "user": STUDENT, "key": str(d / "client_key"),
               "host_key": str(d / "host_key.pub"), "known_hosts": str(d / "known_hosts"), "fingerprint": fp,
               "key_type": kind}
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def sshd(student):
    """A real OpenSSH server on 127.0.0.1 with its own host key, accepting one key for the student.
    ``sshd["known_hosts"]`` is a known_hosts file that trusts it (SSH clients check host keys)."""
    # sshd reads authorized_keys as the student: the folder must be reachable by that user
    d = Path(tempfile.mkdtemp(prefix="labkit-sshd-"))
    os.chmod(d, 0o755)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
    try:
        yield from _sshd(d, d / "client_key.pub")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd_rekeyed(sshd):
    """A second real sshd for the same student and client key, with another host key: what a client sees
    when a host was re-keyed or recreated, or when something else answers in its place."""
    d = Path(tempfile.mkdtemp(prefix="labkit-sshd2-"))
    os.chmod(d, 0o755)
    shutil.copy(sshd["key"], d / "client_key")
    try:
        yield from _sshd(d, sshd["key"] + ".pub")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def open_lab(kind, request):
    if kind == "inprocess":
        return Lab(InProcess(), target="local")
    if kind == "sudo":
        request.getfixturevalue("student")
        # The agent starts through sudo run by the real unprivileged user, as on a student's laptop.
        return Lab(T.sudo_transport(wrapper=["runuser", "-u", STUDENT, "--"]), target="sudo")
    if kind == "ssh":
        s = request.getfixturevalue("sshd")
        return labkit.connect(f"ssh://{s['user']}@{s['host']}:{s['port']}", key_filename=s["key"],
                              known_hosts=s["known_hosts"])
    if kind == "vagrant":
        return request.getfixturevalue("vm_tier").lab()
    raise ValueError(kind)


@pytest.fixture(params=["inprocess", "sudo", "ssh", "vagrant"], scope="module")
def any_lab(request):
    """The same agent test subset runs over every transport, and inside the pure cgroup v2 lab VM."""
    lab = open_lab(request.param, request)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def lab():
    lab = Lab(InProcess(), target="local")
    yield lab
    lab.close()


@pytest.fixture
def rootfs_name(lab, request):
    """A fresh rootfs for one test, removed afterwards."""
    name = "t-" + request.node.name.split("[")[0][-20:].replace("_", "-").strip("-").lower()
    r = lab.rootfs(name, replace=True)
    try:
        yield r.name
    finally:
        r.remove()
