"""The real docker CLI (Debian's docker.io, client side only: no dockerd runs) and the Docker SDK for Python
drive labkit's engine through the daemon's Engine API, with the lecture's verbs; each answer and exit code
as Docker documents them."""
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from labkit.agent import daemon
from labkit.wire.errors import NotFound

from conftest import Tmux

pytestmark = pytest.mark.privileged

DOCKER = "/usr/bin/docker"  # Debian's client (the machine may have another docker earlier on PATH)
NAMES = ("lk-api-web", "lk-api-one", "lk-api-sdk", "lk-api-exec", "lk-api-it", "lk-api-again", "lk-api-top",
         "lk-api-detach", "lk-api-rmif")
needs_docker = pytest.mark.skipif(not os.path.exists(DOCKER), reason="Debian's docker.io is not installed "
                                  "(scripts/setup.sh --dev installs it)")


@pytest.fixture(scope="module")
def engine_api(tmp_path_factory):
    from labkit.agent.local import InProcess
    from labkit.client.lab import Lab
    lab = Lab(InProcess(), target="local")
    assert daemon.status() is None, "no daemon runs before the test"
    networks = {n["spec"]["name"] for n in lab.networks()}
    daemon.start()
    env = dict(os.environ, DOCKER_HOST=f"unix://{daemon.DOCKER_SOCKET}",
               DOCKER_CONFIG=str(tmp_path_factory.mktemp("docker-config")))
    try:
        yield env, lab
    finally:
        daemon.stop()
        for name in NAMES:
            try:
                lab.container(name).rm(force=True)
            except NotFound:
                pass
        for ref in ("lk-api/copy:v1", "lk-api/rmif:v1"):
            try:
                lab.rmi(ref)
            except NotFound:
                pass
        for n in lab.networks():  # the default network the containers made, when it was not there before
            if n["spec"]["name"] not in networks and not n["members"]:
                lab.call("net.remove", name=n["spec"]["name"])
        lab.close()


def docker(env, *args, check=True, timeout=60):
    res = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=env, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {res.returncode}: {res.stdout}{res.stderr}")
    return res


@needs_docker
def test_version_and_info_name_labkit_and_the_negotiated_api(engine_api):
    env, _ = engine_api
    out = docker(env, "version", "--format", "{{json .}}").stdout
    v = json.loads(out)
    assert v["Server"]["Platform"]["Name"] == "labkit" and v["Server"]["ApiVersion"] == "1.41"
    assert v["Client"]["ApiVersion"] == "1.41", "the client settled on the server's version"
    info = docker(env, "info", "--format", "{{.Driver}} {{.OSType}} {{.KernelVersion}}").stdout.split()
    assert info == ["overlay", "linux", os.uname().release]


@needs_docker
def test_run_rm_prints_the_output_returns_the_exit_code_and_removes_the_container(engine_api):
    env, lab = engine_api
    res = docker(env, "run", "--rm", "--name", "lk-api-one", "busybox", "echo", "hello from labkit")
    assert res.stdout == "hello from labkit\n"
    with pytest.raises(NotFound):
        lab.container("lk-api-one")
    res = docker(env, "run", "--rm", "busybox", "sh", "-c", "echo out; exit 3", check=False)
    assert res.returncode == 3 and res.stdout == "out\n", "docker run exits with the container's code"


@needs_docker
def test_the_web_server_walkthrough_with_the_docker_cli(engine_api):
    env, lab = engine_api
    docker(env, "create", "--name", "lk-api-web", "-p", "127.0.0.1:8097:80", "busybox",
           "httpd", "-f", "-v", "-p", "80", "-h", "/etc")
    ps_a = docker(env, "ps", "-a", "--filter", "name=lk-api-web", "--format", "{{.Names}} {{.Status}}").stdout
    assert "lk-api-web Created" in ps_a
    docker(env, "start", "lk-api-web")
    assert docker(env, "ps", "--format", "{{.Names}} {{.Status}} {{.Ports}}").stdout.count("lk-api-web Up") == 1
    body = None
    for _ in range(50):
        try:
            body = urllib.request.urlopen("http://127.0.0.1:8097/os-release", timeout=2).read().decode()
            break
        except OSError:
            time.sleep(0.1)
    assert body and 'NAME="labkit busybox"' in body, "the page came from the container, through the published port"
    assert "response:200" in docker(env, "logs", "lk-api-web").stdout, "httpd -v logged the request"
    top = docker(env, "top", "lk-api-web").stdout
    assert "httpd -f -v -p 80" in top and top.splitlines()[0].split() == ["PID", "UID", "CMD"]
    assert docker(env, "inspect", "--format", "{{.State.Running}}", "lk-api-web").stdout.strip() == "true"
    docker(env, "stop", "-t", "1", "lk-api-web")
    assert "Exited" in docker(env, "ps", "-a", "--filter", "name=lk-api-web", "--format", "{{.Status}}").stdout
    docker(env, "tag", "busybox", "lk-api/copy:v1")
    assert "lk-api/copy" in docker(env, "images", "--format", "{{.Repository}}:{{.Tag}}").stdout
    docker(env, "rmi", "lk-api/copy:v1")
    refused = docker(env, "rmi", "busybox", check=False)
    assert refused.returncode == 1 and "lk-api-web" in refused.stderr and "conflict" in refused.stderr.lower(), \
        "the stopped container still uses the image, as in the lecture"
    docker(env, "rm", "lk-api-web")
    assert "lk-api-web" not in docker(env, "ps", "-a", "--format", "{{.Names}}").stdout


@needs_docker
def test_what_labkit_does_not_do_yet_is_refused_with_the_reason(engine_api):
    env, _ = engine_api
    res = docker(env, "run", "--restart", "always", "busybox", "true", check=False)
    assert res.returncode == 125 and "RestartPolicy" in res.stderr, res.stderr
    res = docker(env, "inspect", "lk-api-none", check=False)
    assert res.returncode == 1 and "lk-api-none" in res.stderr


@needs_docker
def test_run_i_feeds_stdin_to_the_container_and_ends_it_with_eof(engine_api):
    env, lab = engine_api
    res = subprocess.run([DOCKER, "run", "-i", "--rm", "busybox", "sh", "-c", "tr a-z A-Z; echo done"],
                         input="hello labkit\n" * 3000, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "HELLO LABKIT\n" * 3000 + "done\n", "every byte in, in order; EOF when the client's ended"
    lines = "".join(f"{i}\n" for i in range(200000))  # more than any buffer on the way, both ways at once
    res = subprocess.run([DOCKER, "run", "-i", "--rm", "--network", "none", "busybox", "cat"], input=lines,
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout == lines, "the output stream kept its frames whole"


@needs_docker
def test_exec_runs_in_the_container_with_its_streams_and_exit_code(engine_api):
    env, lab = engine_api
    docker(env, "run", "-d", "--name", "lk-api-exec", "--network", "none", "busybox", "sleep", "300")
    res = docker(env, "exec", "lk-api-exec", "sh", "-c", "echo out; echo err >&2; hostname; exit 4", check=False)
    cid = lab.container("lk-api-exec").id
    assert (res.returncode, res.stdout, res.stderr) == (4, f"out\n{cid}\n", "err\n"), "stdout and stderr apart"
    assert docker(env, "exec", "lk-api-exec", "/no/such", check=False).returncode == 127
    res = subprocess.run([DOCKER, "exec", "-i", "lk-api-exec", "cat"], input="piped in\n", capture_output=True,
                         text=True, env=env, timeout=60)
    assert (res.returncode, res.stdout) == (0, "piped in\n")
    docker(env, "stop", "-t", "0", "lk-api-exec")
    res = docker(env, "exec", "lk-api-exec", "true", check=False)
    assert res.returncode == 1 and "is not running" in res.stderr


@needs_docker
def test_run_it_and_exec_it_in_a_real_terminal(engine_api):
    """`docker run -i -t busybox sh` and `docker exec -it web sh` typed in tmux, as the lecture does: a prompt,
    the terminal's size (the CLI's resize), the page edited from inside, and the shell's exit code."""
    env, lab = engine_api
    cli = ["env", f"DOCKER_HOST={env['DOCKER_HOST']}", f"DOCKER_CONFIG={env['DOCKER_CONFIG']}", DOCKER]
    with Tmux("lk-api-it", cli + ["run", "-i", "-t", "--name", "lk-api-it", "--hostname", "inside", "busybox",
                                  "/bin/sh"]) as term:
        term.until("/ #")
        term.type("echo answer-$((6*7)) on $(hostname) size $(stty size) at $(tty)")
        term.until("answer-42 on inside size 30 120 at /dev/pts/0")  # the container's own terminal, the CLI's size
        term.type("exit 5")
        assert term.exit_code() == 5, "docker run -it exits with the shell's code"
    assert lab.container("lk-api-it").inspect()["Config"]["Tty"] is True

    docker(env, "run", "-d", "--name", "lk-api-web", "-p", "127.0.0.1:8098:80", "busybox",
           "httpd", "-f", "-p", "80", "-h", "/var/www")
    with Tmux("lk-api-ex", cli + ["exec", "-it", "lk-api-web", "sh"]) as term:
        term.until("/ #")
        term.type("echo '<h1>edited inside</h1>' > /var/www/index.html; tty; exit")
        assert term.exit_code() == 0
    body = urllib.request.urlopen("http://127.0.0.1:8098/", timeout=5).read().decode()
    assert "edited inside" in body, "the page the exec'd shell edited is what the server sends"
    docker(env, "rm", "-f", "lk-api-web", "lk-api-it")


@needs_docker
def test_raw_rest_with_curl_over_the_socket(engine_api):
    env, _ = engine_api
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run([curl, "-s", "-i", "--unix-socket", daemon.DOCKER_SOCKET, "http://docker/_ping"],
                         capture_output=True, text=True, timeout=30).stdout
    assert out.startswith("HTTP/1.1 200") and "Api-Version: 1.41" in out and out.endswith("OK")
    out = subprocess.run([curl, "-s", "--unix-socket", daemon.DOCKER_SOCKET, "http://docker/v1.41/containers/json?all=1"],
                         capture_output=True, text=True, timeout=30).stdout
    assert isinstance(json.loads(out), list)


def test_the_docker_sdk_creates_starts_reads_logs_and_waits(engine_api):
    docker_sdk = pytest.importorskip("docker")
    env, lab = engine_api
    client = docker_sdk.DockerClient(base_url=env["DOCKER_HOST"], version="auto")
    try:
        c = client.containers.create("busybox", ["sh", "-c", "echo sdk says hi; exit 7"], name="lk-api-sdk")
        c.start()
        assert c.wait(timeout=30)["StatusCode"] == 7
        assert c.logs() == b"sdk says hi\n"
        c.reload()
        assert c.status == "exited"
        c.remove()
        with pytest.raises(docker_sdk.errors.NotFound):
            client.containers.get("lk-api-sdk")
    finally:
        client.close()


def _raw(request, timeout=10):
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(daemon.DOCKER_SOCKET)
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)  # all sent: a body that is short stays short
        data = b""
        while True:
            try:
                piece = s.recv(65536)
            except socket.timeout:
                break
            if not piece:
                break
            data += piece
    return data


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", b"400"),                                                     # no method, no path
    (b"POST /containers/create HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"400"),      # would read to EOF
    (b"POST /containers/create HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", b"413"),  # memory
    (b"GET /_ping HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n", b"400"),   # header flood
    (b"POST /containers/create HTTP/1.1\r\nContent-Length: 5\r\n\r\n[1,2]", b"400"),  # not an object
    (b"POST /containers/create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", b"400"),     # no image
    (b'POST /containers/create HTTP/1.1\r\nContent-Length: 47\r\n\r\n{"Image":"busybox","HostConfig":{"Memory":"x"}}', b"400"),  # a limit, not a number
    (b'POST /containers/create?name=../../etc HTTP/1.1\r\nContent-Length: 19\r\n\r\n{"Image":"busybox"}', b"400"),
    (b"DELETE /images/..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\n\r\n", b"404"),              # a path for a name
    (b"GET /containers/%00/json HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /v1.99/version HTTP/1.1\r\n\r\n", b"400"),                                # newer than 1.41
    (b"POST /containers/create HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
    (b"POST /containers/create HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", b"400"),
    (b'POST /containers/create HTTP/1.1\r\nContent-Length: 41\r\n\r\n{"Image":"busybox","Cmd":"echo hi there"}', b"400"),
    (b'POST /containers/create HTTP/1.1\r\nContent-Length: 46\r\n\r\n{"Image":"busybox","HostConfig":{"Dns":["1"]}}', b"400"),
    (b'POST /containers/create HTTP/1.1\r\nContent-Length: 36\r\n\r\n{"Image":"busybox","HostConfig":[1]}', b"400"),
    (b"POST /containers/create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}", b"400"),          # body ends early
    (b"GET /containers/json?filters=%7B%22label%22%3A%5B%22a%22%5D%7D HTTP/1.1\r\n\r\n", b"400"),  # unknown filter
])
def test_hostile_requests_get_a_clear_refusal_and_the_daemon_goes_on(engine_api, request_bytes, status):
    answer = _raw(request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b'"message"' in answer
    assert _raw(b"GET /_ping HTTP/1.1\r\nConnection: close\r\n\r\n").endswith(b"OK"), "it still answers"


@needs_docker
def test_filters_kill_tail_and_wait_as_docker_documents_them(engine_api):
    env, lab = engine_api
    docker(env, "create", "--name", "lk-api-one", "--network", "none", "busybox", "sh", "-c",
           "for i in 1 2 3 4 5; do echo line $i; done; sleep 60")
    created = docker(env, "ps", "-a", "-q", "-f", "status=created", "-f", "name=lk-api-one").stdout.split()
    assert created == [lab.container("lk-api-one").id]
    assert docker(env, "ps", "-q", "-f", "name=lk-api-one").stdout == "", "not running: not in plain ps"
    refused = docker(env, "ps", "-f", "label=x", check=False)
    assert refused.returncode == 1 and "does not filter by 'label'" in refused.stderr
    waited = subprocess.run(["curl", "-s", "-X", "POST", "--unix-socket", daemon.DOCKER_SOCKET,
                             "http://docker/v1.41/containers/lk-api-one/wait?condition=not-running"],
                            capture_output=True, text=True, timeout=10)
    assert json.loads(waited.stdout)["StatusCode"] == 0, "a container that never ran is not running: at once"
    docker(env, "start", "lk-api-one")
    for _ in range(50):
        if "line 5" in docker(env, "logs", "lk-api-one").stdout:
            break
        time.sleep(0.1)
    assert docker(env, "logs", "--tail", "2", "lk-api-one").stdout == "line 4\nline 5\n"
    refused = docker(env, "kill", "-s", "NOSUCH", "lk-api-one", check=False)
    assert refused.returncode == 1 and "invalid signal" in refused.stderr
    docker(env, "kill", "-s", "TERM", "lk-api-one")  # sh as PID 1 ignores TERM, as under Docker
    time.sleep(0.3)
    assert lab.container("lk-api-one").status == "running"
    docker(env, "kill", "lk-api-one")  # KILL
    assert docker(env, "wait", "lk-api-one").stdout.strip() == "137"
    docker(env, "rm", "lk-api-one")


@needs_docker
def test_build_network_push_and_search_with_the_docker_cli(engine_api, tmp_path):
    """`docker build` (a tar context, the classic builder's stream), `docker network create/ls/rm`, `docker push`
    to a registry on 127.0.0.1 and `docker search` in its catalog."""
    env, lab = engine_api
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text('FROM busybox\nCOPY hello.txt /hello.txt\nCMD ["cat", "/hello.txt"]\n')
    (ctx / "hello.txt").write_text("built through the Engine API\n")
    out = docker(env, "build", "-t", "lk-api/built:v1", str(ctx), timeout=300).stdout
    assert "Step 2/3 : COPY hello.txt /hello.txt" in out and "Successfully tagged lk-api/built:v1" in out
    assert docker(env, "run", "--rm", "--network", "none", "lk-api/built:v1").stdout == "built through the Engine API\n"
    import gzip
    import io
    import tarfile
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w") as tar:
        big = tarfile.TarInfo("zeros")
        big.size = 200 << 20
        tar.addfile(big, io.BytesIO(bytes(big.size)))
    body = gzip.compress(bomb.getvalue(), 9)  # some 200 KiB that unpack to 200 MiB
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket",
                          daemon.DOCKER_SOCKET, "-X", "POST", "-H", "Content-Type: application/x-tar",
                          "--data-binary", "@-", "http://d/v1.41/build?t=lk-api/bomb:v1"], input=body,
                         capture_output=True, timeout=60).stdout
    assert out == b"413", f"a context that unpacks past the limit is refused before it is unpacked: {out}"
    (ctx / "Dockerfile").write_text("FROM busybox\nRUN exit 3\n")
    failed = docker(env, "build", "-t", "lk-api/broken:v1", str(ctx), check=False, timeout=300)
    assert failed.returncode != 0 and "exit" in failed.stderr.lower(), failed.stderr

    docker(env, "network", "create", "lkapi")
    try:
        assert "lkapi" in docker(env, "network", "ls", "--format", "{{.Name}}").stdout.split()
        subnet = json.loads(docker(env, "network", "inspect", "lkapi").stdout)[0]["IPAM"]["Config"][0]["Subnet"]
        ip = docker(env, "run", "--rm", "--network", "lkapi", "busybox", "sh", "-c",
                    "ip -4 -o addr show eth0").stdout
        assert subnet.rsplit(".", 2)[0] in ip, (subnet, ip)
        assert docker(env, "network", "create", "lkapi", check=False).returncode == 1, "a second one, refused"
    finally:
        docker(env, "network", "rm", "lkapi")
    assert "lkapi" not in docker(env, "network", "ls", "--format", "{{.Name}}").stdout.split()

    from test_registry import REGISTRY, start_registry
    if not REGISTRY:
        pytest.fail("docker-registry is missing: scripts/setup.sh --dev installs it")
    (tmp_path / "registry").mkdir()
    proc, port = start_registry(str(tmp_path / "registry"))
    try:
        ref = f"127.0.0.1:{port}/course/built:v1"
        docker(env, "tag", "lk-api/built:v1", ref)
        pushed = docker(env, "push", ref, timeout=300).stdout
        assert "digest: sha256:" in pushed, pushed
        found = docker(env, "search", f"127.0.0.1:{port}/built").stdout
        assert f"127.0.0.1:{port}/course/built" in found, found
        docker(env, "rmi", ref)
        pulled = docker(env, "pull", ref, timeout=300)
        assert "Downloaded newer image" in pulled.stdout, pulled.stdout
        assert docker(env, "run", "--rm", "--network", "none", ref).stdout == "built through the Engine API\n"
        docker(env, "rmi", ref)
    finally:
        proc.terminate()
        proc.wait(10)
        for r in ("lk-api/built:v1", "lk-api/broken:v1"):
            try:
                lab.rmi(r)
            except NotFound:
                pass


@needs_docker
def test_start_a_of_a_container_that_ran_before_waits_for_this_run_and_top_takes_no_ps_options(engine_api):
    env, _ = engine_api
    docker(env, "create", "--name", "lk-api-again", "--network", "none", "busybox", "sh", "-c", "echo ran; sleep 0.5")
    assert docker(env, "start", "-a", "lk-api-again").stdout == "ran\n"
    assert docker(env, "start", "-a", "lk-api-again").stdout == "ran\n", "this run's output, not the last run's end"
    docker(env, "run", "-d", "--name", "lk-api-top", "--network", "none", "busybox", "sleep", "300")
    refused = docker(env, "top", "lk-api-top", "aux", check=False)
    assert refused.returncode == 1 and "ps options" in refused.stderr, "not taken and ignored"
    docker(env, "rm", "-f", "lk-api-top", "lk-api-again")


def _hijack(path, body=b""):
    """A POST that upgrades to a raw stream (attach, exec start): the socket after the 101, and what followed it."""
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(daemon.DOCKER_SOCKET)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    head = b""
    while b"\r\n\r\n" not in head:
        piece = s.recv(4096)
        assert piece, f"hung up before its answer: {head!r}"
        head += piece
    head, _, rest = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return s, rest


def _read_until(s, text, got=b"", seconds=10):
    deadline = time.monotonic() + seconds
    while text not in got and time.monotonic() < deadline:
        piece = s.recv(65536)
        if not piece:
            break
        got += piece
    assert text in got, got[-400:]
    return got


def _hung_up(s, seconds=10):
    """True when the server ends the stream (what it sends meanwhile is read and dropped)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not s.recv(65536):
                return True
        except OSError:
            return True
    return False


@needs_docker
def test_detach_keys_leave_the_container_running_for_the_cli_and_for_a_raw_client(engine_api):
    """Ctrl-P Ctrl-Q in `docker run -it` (the CLI watches for them), then `docker attach` and the shell's exit
    code; a raw client that asks for its own keys (detachKeys=ctrl-x,x, exec's DetachKeys) is let go by the
    daemon when it types them, and the program goes on; keys that are not keys are a 400."""
    env, lab = engine_api
    cli = ["env", f"DOCKER_HOST={env['DOCKER_HOST']}", f"DOCKER_CONFIG={env['DOCKER_CONFIG']}", DOCKER]
    with Tmux("lk-api-detach", cli + ["run", "-it", "--name", "lk-api-detach", "--network", "none", "busybox",
                                      "sh"]) as term:
        term.until("/ #")
        term.keys("C-p", "C-q")
        assert term.exit_code() == 0, "docker run -it exits 0 when detached"
    assert docker(env, "inspect", "-f", "{{.State.Running}}", "lk-api-detach").stdout.strip() == "true"
    cid = lab.container("lk-api-detach").id

    s, got = _hijack(f"/v1.41/containers/{cid}/attach?stream=1&stdin=1&stdout=1&detachKeys=ctrl-x,x")
    with s:
        s.sendall(b"echo raw-$((3*3))\n")
        _read_until(s, b"raw-9", got)
        s.sendall(b"\x18x")
        assert _hung_up(s), "the daemon ended the attach at the client's detach keys"
    assert docker(env, "inspect", "-f", "{{.State.Running}}", "lk-api-detach").stdout.strip() == "true"

    answer = _raw(b"POST /v1.41/containers/%s/attach?stream=1&stdin=1&stdout=1&detachKeys=ctrl-9 HTTP/1.1\r\n"
                  b"Connection: close\r\n\r\n" % cid.encode())
    assert answer.startswith(b"HTTP/1.1 400") and b"Invalid detach keys" in answer, answer[:300]

    body = json.dumps({"Cmd": ["sh"], "Tty": True, "AttachStdin": True, "AttachStdout": True,
                       "DetachKeys": "ctrl-x,x"}).encode()
    made = _raw(b"POST /v1.41/containers/%s/exec HTTP/1.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (cid.encode(), len(body)) + body)
    eid = json.loads(made.partition(b"\r\n\r\n")[2])["Id"]
    s, got = _hijack(f"/v1.41/exec/{eid}/start", json.dumps({"Tty": True}).encode())
    with s:
        s.sendall(b"echo in-exec-$((5*5))\n")
        _read_until(s, b"in-exec-25", got)
        s.sendall(b"\x18x")
        assert _hung_up(s), "the daemon ended exec's stream at the detach keys"
    time.sleep(0.5)
    state = json.loads(_raw(b"GET /v1.41/exec/%s/json HTTP/1.1\r\nConnection: close\r\n\r\n" % eid.encode())
                       .partition(b"\r\n\r\n")[2])
    assert state["Running"] is True and state["DetachKeys"] == "ctrl-x,x", "the exec'd shell goes on"

    with Tmux("lk-api-attach", cli + ["attach", "lk-api-detach"]) as term:
        term.prompt()
        term.type("exit 9")
        assert term.exit_code() == 9, "docker attach ends with the container's exit code"
    docker(env, "rm", "lk-api-detach")


@needs_docker
def test_rmi_force_untags_a_name_its_containers_keep_their_layers(engine_api):
    env, _ = engine_api
    docker(env, "tag", "busybox", "lk-api/rmif:v1")
    docker(env, "run", "-d", "--name", "lk-api-rmif", "--network", "none", "lk-api/rmif:v1", "sleep", "60")
    docker(env, "stop", "-t", "0", "lk-api-rmif")
    res = docker(env, "rmi", "lk-api/rmif:v1", check=False)
    assert res.returncode == 1 and "must force" in res.stderr, "without -f a stopped container still holds it"
    assert "Untagged: lk-api/rmif:v1" in docker(env, "rmi", "-f", "lk-api/rmif:v1").stdout
    docker(env, "start", "lk-api-rmif")
    assert docker(env, "inspect", "-f", "{{.State.Running}}", "lk-api-rmif").stdout.strip() == "true", \
        "the container starts again: its layers stayed"
    docker(env, "rm", "-f", "lk-api-rmif")
