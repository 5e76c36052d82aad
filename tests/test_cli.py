"""The `labkit` command line."""
import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import Tmux, http_get

pytestmark = pytest.mark.privileged


def labkit(*args):
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_doctor_prints_a_table():
    res = labkit("doctor", "--target", "local")
    assert res.returncode == 0, res.stderr
    assert "cgroups" in res.stdout and "namespaces" in res.stdout and "kvm" in res.stdout


def test_bad_target_exits_2_with_the_fix():
    res = labkit("doctor", "--target", "floppy://a")
    assert res.returncode == 2 and "fix:" in res.stderr and "ssh://" in res.stderr


def test_cleanup_dry_run():
    res = labkit("cleanup", "--target", "local", "--dry-run")
    assert res.returncode == 0, res.stderr


def test_assign_strips_solutions(tmp_path):
    res = labkit("assign", "--output", str(tmp_path / "class"), "--bundle", str(tmp_path / "grading" / "bundle.json"))
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "class" / "02-namespaces.ipynb").read_text()
    assert "BEGIN SOLUTION" not in text and "box = lab.spawn(" not in text
    assert "box = None" in text
    bundle = json.loads((tmp_path / "grading" / "bundle.json").read_text())
    assert sum(n["points"] for n in bundle["notebooks"].values()) == 93 and "93 points" in res.stdout
    # --keep: a student's work already there stays as it is; only what is missing is written
    (tmp_path / "class" / "02-namespaces.ipynb").write_text("my work")
    (tmp_path / "class" / "03-cgroups.ipynb").unlink()
    again = labkit("assign", "--output", str(tmp_path / "class"), "--keep")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "class" / "02-namespaces.ipynb").read_text() == "my work"
    assert "03-cgroups.ipynb" in again.stdout and "02-namespaces" not in again.stdout


def test_lab_student_runs_the_blank_editions(tmp_path):
    res = labkit("lab", "--student", "--target", "local", "--output", str(tmp_path), "00-setup.ipynb")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "student editions" in res.stdout and re.search(r"00-setup\.ipynb\s+0/2 ", res.stdout), res.stdout
    assert "BEGIN SOLUTION" not in (tmp_path / "student-editions" / "00-setup.ipynb").read_text()


def test_run_it_gives_the_container_a_terminal(tmp_path):
    """`labkit run -it busybox sh` typed in a real terminal (tmux): a prompt, our input, the answer from the
    container's own terminal, of this terminal's size, and the shell's exit code."""
    with Tmux("lk-test-it", [sys.executable, "-m", "labkit.cli", "run", "-it", "--rm", "--name", "t-it",
                             "--hostname", "inside", "--network", "none", "busybox", "sh"]) as term:
        term.until("/ #")
        term.type("echo answer-$((6*7)) from $(hostname) at $(tty) size $(stty size)")
        term.until("answer-42 from inside at /dev/pts/0 size 30 120")
        term.type("exit 4")
        assert term.exit_code() == 4
    names = labkit(*["ps", "-a", "--target", "local"]).stdout
    assert "t-it" not in names, "--rm removed the container after the shell exited"


def _state_of(name):
    return labkit("inspect", "--target", "local", "--format", "{{.State.Running}}", name).stdout.strip()


def test_detach_keys_leave_the_container_running_and_attach_takes_it_back():
    """Ctrl-P Ctrl-Q in `labkit run -it` leaves the shell running (exit 0 here); `labkit attach` gives the terminal
    back (custom --detach-keys too); the shell's exit ends attach with its code, and --rm removes it then."""
    cli = [sys.executable, "-m", "labkit.cli"]
    try:
        with Tmux("lk-test-detach", cli + ["run", "-it", "--rm", "--name", "t-detach", "--network", "none",
                                           "busybox", "sh"]) as term:
            term.until("/ #")
            term.type("echo before-$((1+1))")
            term.until("before-2")
            term.keys("C-p", "C-q")
            assert term.exit_code() == 0, "detached: the command is done, with 0"
        assert _state_of("t-detach") == "True", "the shell runs on without a terminal attached"
        with Tmux("lk-test-attach", cli + ["attach", "--detach-keys", "ctrl-x,x", "t-detach"]) as term:
            term.prompt()
            term.type("echo back-$((2+2))")
            term.until("back-4")
            term.keys("C-x", "x")
            assert term.exit_code() == 0
        assert _state_of("t-detach") == "True"
        with Tmux("lk-test-attach2", cli + ["attach", "t-detach"]) as term:
            term.prompt()
            term.type("exit 6")
            assert term.exit_code() == 6, "attach ends with the container's exit code"
        deadline = time.monotonic() + 15
        while "t-detach" in labkit("ps", "-a", "--target", "local").stdout and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "t-detach" not in labkit("ps", "-a", "--target", "local").stdout, \
            "run --rm: removed when it ended, though its client had detached"
    finally:
        labkit("rm", "-f", "--target", "local", "t-detach")
    bad = labkit("run", "-it", "--target", "local", "--detach-keys", "ctrl-1", "busybox", "sh")
    assert bad.returncode == 125 and "invalid detach key" in bad.stderr, bad.stderr


def test_attach_to_a_container_without_a_terminal_is_refused_with_the_way_to_its_output():
    labkit("run", "-d", "--target", "local", "--name", "t-noterm", "--network", "none", "busybox", "sleep", "60")
    try:
        res = labkit("attach", "--target", "local", "t-noterm")
        assert res.returncode == 1 and "no terminal" in res.stderr and "logs -f" in res.stderr, res.stderr
    finally:
        labkit("rm", "-f", "--target", "local", "t-noterm")


def test_run_dit_keeps_a_terminal_and_a_stdin_for_later():
    """-d with -i and -t is not -d alone: the shell gets a terminal and a stdin that stay open, so it runs on."""
    res = labkit("run", "-dit", "--target", "local", "--name", "t-cli-dit", "--network", "none", "busybox", "sh")
    assert res.returncode == 0, res.stderr
    try:
        time.sleep(0.5)
        out = labkit("inspect", "--target", "local", "--format", "{{.Config.Tty}} {{.Config.OpenStdin}} {{.State.Running}}",
                     "t-cli-dit").stdout.split()
        assert out == ["True", "True", "True"], out
    finally:
        labkit("rm", "-f", "--target", "local", "t-cli-dit")


def test_exit_codes_help_and_management_forms_are_dockers():
    for args, code, said in ((["run", "--target", "local", "--rm", "--network", "none", "busybox", "/no/such"], 127,
                              "No such file"),
                             (["run", "--target", "local", "--rm", "--network", "none", "busybox", "/etc"], 126,
                              "not a program"),
                             (["run", "--target", "local", "--bogus", "busybox"], 125, "unrecognized"),
                             (["run", "--target", "local", "--rm", "--network", "none", "busybox", "sh", "-c", "exit 7"],
                              7, ""),
                             (["run", "--target", "local", "no-such-image:v9"], 125, "no-such-image"),
                             (["container"], 125, "ls"), (["image", "frob"], 125, "rm"),
                             (["kill", "--target", "local", "-s", "NOPE", "x"], 125, "not a signal"),
                             (["stop", "--target", "local", "t-cli-none"], 1, "no such container")):
        res = labkit(*args)
        assert res.returncode == code and said in res.stderr, (args, res.returncode, res.stderr)
    for verb in ("run", "create"):
        res = labkit(verb, "--help")
        assert res.returncode == 0 and "--hostname" in res.stdout and "--publish" in res.stdout
    assert labkit("container", "ls", "--help").stdout.startswith("usage: labkit ps")
    v = labkit("version", "--target", "local")
    assert v.returncode == 0 and "Client:" in v.stdout and "Server: labkit's agent" in v.stdout
    assert labkit("--version").stdout.startswith("labkit ")


def test_exec_it_gives_the_command_this_terminal_and_exec_i_this_stdin(tmp_path):
    """`labkit exec -it web sh` typed in tmux: edit the page from inside, as the lecture does; `exec -i` reads a
    pipe; `exec -t` without a terminal is refused with Docker's words."""
    run = labkit("run", "-d", "--target", "local", "--name", "t-cli-ex", "-p", "127.0.0.1:18111:80", "busybox",
                 "httpd", "-f", "-p", "80", "-h", "/var/www")
    assert run.returncode == 0, run.stderr
    try:
        with Tmux("lk-test-exec-it", [sys.executable, "-m", "labkit.cli", "exec", "-it", "t-cli-ex", "sh"],
                  cols=100, rows=25) as term:
            term.until("/ #")
            term.type("echo '<h1>from exec -it</h1>' > /var/www/index.html; tty && exit 3")
            assert term.exit_code() == 3, "tty named the container's terminal, and the shell's code came back"
        assert "from exec -it" in http_get("http://127.0.0.1:18111/")
        piped = subprocess.run([sys.executable, "-m", "labkit.cli", "exec", "-i", "--target", "local", "t-cli-ex",
                                "cat"], input="through stdin\n", capture_output=True, text=True, timeout=60)
        assert (piped.returncode, piped.stdout) == (0, "through stdin\n")
        no_tty = subprocess.run([sys.executable, "-m", "labkit.cli", "exec", "-it", "--target", "local", "t-cli-ex",
                                 "sh"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert no_tty.returncode == 1 and "the input device is not a TTY" in no_tty.stderr
    finally:
        labkit("rm", "-f", "--target", "local", "t-cli-ex")


def test_inspect_format_renders_like_docker():
    from labkit.cli import render_format
    data = {"NetworkSettings": {"IPAddress": "10.213.0.2", "Ports": {"80/tcp": [1]}}, "State": {"Running": True}}
    assert render_format("{{.NetworkSettings.IPAddress}}", data) == "10.213.0.2"
    assert render_format("ip={{ .NetworkSettings.IPAddress }} up={{.State.Running}}", data) == "ip=10.213.0.2 up=True"
    assert render_format("{{json .NetworkSettings.Ports}}", data) == '{"80/tcp": [1]}'
    assert render_format("{{.Nothing.Here}}", data) == ""


def test_docker_verbs_from_the_shell():
    run = labkit("run", "-d", "--target", "local", "--name", "t-cli-web", "-p", "18110:80", "busybox",
                 "httpd", "-f", "-p", "80", "-h", "/var/www")
    assert run.returncode == 0, run.stderr
    try:
        assert "t-cli-web" in labkit("ps", "--target", "local").stdout
        ip = labkit("inspect", "--target", "local", "--format", "{{.NetworkSettings.IPAddress}}", "t-cli-web").stdout
        assert ip.strip().startswith("10.213.0.")
        assert "httpd" in labkit("top", "--target", "local", "t-cli-web").stdout
        assert labkit("exec", "--target", "local", "t-cli-web", "hostname").returncode == 0
        rmi = labkit("rmi", "--target", "local", "busybox")
        assert rmi.returncode == 1 and "used by container" in rmi.stderr, "docker rmi's code for a refusal"
        assert "t-cli-web" in labkit("container", "ls", "--target", "local").stdout
        assert "busybox" in labkit("image", "ls", "--target", "local").stdout
        assert labkit("container", "inspect", "--target", "local", "busybox").returncode == 1, "not a container"
        assert json.loads(labkit("inspect", "--target", "local", "busybox").stdout)[0]["config"], "an image, then"
        assert labkit("stop", "--target", "local", "-t", "1", "t-cli-web").returncode == 0
        assert "Exited (137)" in labkit("ps", "-a", "--target", "local").stdout
    finally:
        labkit("rm", "-f", "--target", "local", "t-cli-web")
        import labkit as lk
        lab = lk.connect("local")
        for n in lab.networks():  # the engine made the default network on first use: give it back
            if n["spec"]["name"] == "default" and not n["members"]:
                lab.call("net.remove", name="default")


@contextlib.contextmanager
def _jupyter(*args):
    """`labkit jupyter ARGS` on a free port: yields (port, token); then Ctrl-C (SIGINT), which must end it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "jupyter", *args, "--port", str(port),
                             "--target", "local"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = lines[1].strip()
        assert url.startswith(f"http://127.0.0.1:{port}/lab?token="), lines
        yield port, url.split("token=", 1)[1]
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 30  # (a killed command's JupyterLab gets SIGTERM and shuts down)
    while subprocess.run(["pgrep", "-f", f"ServerApp.port={port}"], capture_output=True).returncode == 0 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", f"ServerApp.port={port}"], capture_output=True, text=True).stdout
    assert left == "", "JupyterLab is gone with it"


def test_jupyter_dies_with_a_killed_command():
    """SIGKILL to `labkit jupyter` (no chance to stop anything): its JupyterLab, in a session of its own, still goes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "jupyter", "--port", str(port), "--target", "local"],
                            stdout=subprocess.PIPE, text=True)
    assert "token=" in [proc.stdout.readline(), proc.stdout.readline()][1]
    server = int(subprocess.run(["pgrep", "-f", f"ServerApp.port={port}"], capture_output=True, text=True).stdout.split()[0])
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{server}") and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = not os.path.exists(f"/proc/{server}")
    if not gone:
        os.kill(server, signal.SIGKILL)
    assert gone, "JupyterLab outlived the command that started it"


def test_jupyter_opens_the_course_with_a_fresh_token_and_ctrl_c_stops_it(tmp_path):
    """`labkit jupyter`: JupyterLab on 127.0.0.1 serving the student editions it made, reachable only with the
    token it printed; Ctrl-C (SIGINT) ends it and every process it started."""
    course = tmp_path / "course"
    with _jupyter("--student", "--dir", str(course)) as (port, token):
        assert len(token) >= 32
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token={token}", timeout=30) as r:
            names = {c["name"] for c in json.load(r)["content"]}
        assert "00-setup.ipynb" in names and "08-security.ipynb" in names, names
        nb = json.loads((course / "01-chroot.ipynb").read_text())
        assert not any("### BEGIN SOLUTION" in "".join(c["source"]) for c in nb["cells"]), "the student edition"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token=wrong", timeout=30)
        assert refused.value.code == 403


def test_jupyter_big_screen_serves_the_projector_style_sheet_and_leaves_no_config():
    before = set(glob.glob("/tmp/labkit-jupyter-*"))
    with _jupyter("--big-screen") as (port, token):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/custom/custom.css?token={token}", timeout=30) as r:
            css = r.read().decode()
        assert ".labkit-steps" in css and "--jp-content-font-size1: 24px" in css, css[:200]
    assert set(glob.glob("/tmp/labkit-jupyter-*")) == before, "its configuration folder is gone"
