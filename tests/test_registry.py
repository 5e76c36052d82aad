"""pull and push against a real registry (Debian's docker-registry on 127.0.0.1), and skopeo both ways; then
pull and push against hostile registries (small http.server registries on 127.0.0.0/8) that redirect
credentials away, downgrade https, name a file:// token realm, send endless or oversized answers and
compression bombs, or answer a manifest differently the second time. Every refusal is typed, says what to
do, and leaves nothing in /var/lib/labkit."""
import base64
import bz2
import glob
import gzip
import hashlib
import http.server
import io
import ipaddress
import json
import lzma
import os
import platform
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from labkit.agent import registry as agent_registry
from labkit.agent import store as agent_store
from labkit.wire.errors import InvalidSpec, NotFound, RegistryError, UnsafeLayer

from conftest import oci_layout

pytestmark = pytest.mark.privileged
REGISTRY = shutil.which("docker-registry", path="/usr/bin:/usr/sbin")


def start_registry(d, extra="", auth=""):
    """docker-registry on a free port of 127.0.0.1, storing in ``d``; returns (process, port) once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(f"{d}/config.yml", "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
                f"{extra}http:\n  addr: 127.0.0.1:{port}\n{auth}")
    proc = subprocess.Popen([REGISTRY, "serve", f"{d}/config.yml"], stdout=subprocess.DEVNULL,
                            stderr=open(f"{d}/log", "wb"))
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return proc, port
        except urllib.error.HTTPError:
            return proc, port  # 401: up, and asking for credentials
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("docker-registry did not start: " + open(f"{d}/log").read())


@pytest.fixture(scope="module")
def registry():
    if not REGISTRY:
        pytest.fail("docker-registry is missing: scripts/setup.sh --dev installs it")
    d = tempfile.mkdtemp(prefix="labkit-registry-")
    proc, port = start_registry(d, "  delete:\n    enabled: true\n")
    try:
        yield {"host": f"127.0.0.1:{port}", "dir": d}
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


BUILT_KEYS = set()


@pytest.fixture
def built(lab):
    rec = lab.build("FROM busybox\nRUN echo pushed > /pushed  # %s\nCMD [\"cat\", \"/pushed\"]\n"
                    % os.urandom(4).hex(), "t-reg:v1")
    BUILT_KEYS.update(st["key"] for st in rec["steps"][1:])
    yield "t-reg:v1"
    for ref in [i["ref"] for i in lab.images()]:
        if "t-reg" in ref or ref.startswith("127.0.0.1"):
            _rmi(lab, ref)
    lab.prune(cache_keys=BUILT_KEYS)


def skopeo(*args):
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, check=True).stdout


def test_push_then_pull_back_and_skopeo_agrees(lab, registry, built):
    ref = f"{registry['host']}/course/app:v1"
    lab.tag(built, ref)
    rec = lab.push(ref)
    layers = lab.image(ref)["layers"]
    assert set(layers) <= set(rec["facts"]["pushed_blobs"])
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{ref}"))
    assert info["Layers"] == layers
    again = lab.push(ref)
    assert again["facts"]["pushed_blobs"] == [], "blobs the registry has are not sent twice"
    lab.rmi(ref)
    pulled = lab.pull(ref)
    assert pulled["image"]["layers"] == layers
    assert any(s.get("kind") == "http" and s["url"].endswith("/manifests/v1") for s in pulled["steps"])
    res = lab.run_container(ref, None, detach=False, rm=True, network=None)
    assert res["exit_code"] == 0 and res["logs"].strip() == "pushed"


def test_the_cli_tags_pushes_and_searches_as_docker_does(lab, registry, built):
    """`labkit tag SRC NAME:latest` (the positional that once collided with --target), push, then `labkit search`
    finds it in the registry's catalog, in docker search's columns."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "labkit.cli", *args, "--target", "local"], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, LABKIT_DAEMON="off"))
    ref = f"{registry['host']}/course/searchme:latest"
    res = cli("tag", built, ref)
    assert res.returncode == 0, res.stderr
    assert cli("push", ref).returncode == 0
    out = cli("search", "--registry", registry["host"], "searchme")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == ["NAME", "DESCRIPTION", "STARS", "OFFICIAL"]
    assert f"{registry['host']}/course/searchme" in out.stdout
    rows = out.stdout.splitlines()[2:]  # (the header, then its underline)
    assert rows and all("searchme" in line for line in rows), "only names holding the term"
    assert lab.search("nothing-like-it", registry=registry["host"]) == []


def test_pull_what_skopeo_pushed(lab, registry, built, tmp_path):
    lab.export_image(built, str(tmp_path / "layout"))
    ref = f"{registry['host']}/from/skopeo:v2"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path}/layout:v1", f"docker://{ref}")
    pulled = lab.pull(ref)
    assert pulled["image"]["layers"] == lab.image(built)["layers"]


def test_a_root_tree_with_device_nodes_pulls_and_runs(lab, registry, tmp_path):
    """Images made from a real root tree (debootstrap, `docker import` of a tar) carry /dev/null and friends.
    Docker pulls and runs them; so does labkit: the nodes are left out of the layer (the container's /dev is
    made at start) and the pull says which. The tree is packed by GNU tar and pushed by skopeo."""
    root = tmp_path / "root"
    for d in ("bin", "dev", "etc", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy(shutil.which("busybox", path="/usr/bin:/bin"), root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    (root / "etc" / "hostname").write_text("rootfs-image\n")
    for name, kind, major, minor in (("null", "c", 1, 3), ("zero", "c", 1, 5), ("full", "c", 1, 7),
                                     ("random", "c", 1, 8), ("urandom", "c", 1, 9), ("tty", "c", 5, 0),
                                     ("console", "c", 5, 1), ("loop0", "b", 7, 0)):
        subprocess.run(["mknod", "-m", "666", str(root / "dev" / name), kind, str(major), str(minor)], check=True)
    layer = tmp_path / "layer.tar"
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(layer), "."], check=True)
    layout = oci_layout(tmp_path / "layout", layer.read_bytes(), {"Cmd": ["/bin/sh"]}, tag="v1")
    ref = f"{registry['host']}/course/rootfs:v1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{ref}")
    try:
        pulled = lab.pull(ref)
        assert sorted(pulled["facts"]["devices_skipped"]) == sorted(
            f"dev/{n}" for n in ("null", "zero", "full", "random", "urandom", "tty", "console", "loop0"))
        res = lab.run_container(ref, ["sh", "-c", "cat /etc/hostname; echo x > /dev/null && head -c 4 /dev/zero | "
                                      "wc -c; ls /dev"], detach=False, rm=True, network=None)
        assert res["exit_code"] == 0, res["logs"]
        lines = res["logs"].split()
        assert lines[0] == "rootfs-image" and lines[1] == "4" and "loop0" not in lines and "null" in lines
    finally:
        _rmi(lab, ref)


def _put_blob(host, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.urlopen(urllib.request.Request(f"http://{host}/v2/{repo}/blobs/uploads/", data=b"",
                                                          method="POST"))
    loc = start.headers["Location"]
    loc = (loc if loc.startswith("http") else f"http://{host}{loc}") + ("&" if "?" in loc else "?") + f"digest={digest}"
    urllib.request.urlopen(urllib.request.Request(loc, data=data, method="PUT",
                                                  headers={"Content-Type": "application/octet-stream"}))
    return digest


def test_an_index_resolves_to_this_machines_platform(lab, registry, built):
    host, repo = registry["host"], "multi/app"
    ref = f"{host}/{repo}:v1"
    lab.tag(built, ref)
    lab.push(ref)
    mt = "application/vnd.oci.image.manifest.v1+json"
    base = f"http://{host}/v2/{repo}/manifests"
    body = urllib.request.urlopen(urllib.request.Request(f"{base}/v1", headers={"Accept": mt})).read()
    mine = json.loads(body)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
    other = "arm64" if arch == "amd64" else "amd64"
    # a second, real manifest for the other CPU: same layers, a config that says so
    cfg = json.loads(urllib.request.urlopen(f"http://{host}/v2/{repo}/blobs/{mine['config']['digest']}").read())
    cfg["architecture"] = other
    cdata = json.dumps(cfg).encode()
    theirs = dict(mine, config=dict(mine["config"], digest=_put_blob(host, repo, cdata), size=len(cdata)))
    tbody = json.dumps(theirs).encode()
    urllib.request.urlopen(urllib.request.Request(f"{base}/other", data=tbody, method="PUT",
                                                  headers={"Content-Type": mt}))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": mt, "digest": "sha256:" + hashlib.sha256(tbody).hexdigest(), "size": len(tbody),
         "platform": {"os": "linux", "architecture": other}},
        {"mediaType": mt, "digest": "sha256:" + hashlib.sha256(body).hexdigest(), "size": len(body),
         "platform": {"os": "linux", "architecture": arch}}]}
    urllib.request.urlopen(urllib.request.Request(f"{base}/multi", data=json.dumps(index).encode(), method="PUT",
                                                  headers={"Content-Type": "application/vnd.oci.image.index.v1+json"}))
    pulled = lab.pull(f"{host}/{repo}:multi")
    assert pulled["image"]["layers"] == lab.image(built)["layers"]
    urls = [st["url"] for st in pulled["steps"] if st.get("kind") == "http"]
    assert any(u.endswith(index["manifests"][1]["digest"]) for u in urls), "it fetched this CPU's manifest"
    assert not any(u.endswith(index["manifests"][0]["digest"]) for u in urls)


def test_a_registry_that_lies_about_a_digest_is_refused(lab, registry, built):
    ref = f"{registry['host']}/liar/app:v1"
    lab.tag(built, ref)
    lab.push(ref)
    top = lab.image(ref)["layers"][-1]
    lab.rmi(ref)
    lab.rmi(built)
    lab.prune(cache_keys=BUILT_KEYS)  # the top layer is only in the registry now
    data = os.path.join(registry["dir"], "data", "docker", "registry", "v2", "blobs", "sha256", top[7:9], top[7:], "data")
    with open(data, "r+b") as f:
        f.seek(700)
        f.write(b"EVIL")
    before = {i["ref"] for i in lab.images()}
    with pytest.raises(UnsafeLayer, match="not the .* it promised"):
        lab.pull(ref)
    assert {i["ref"] for i in lab.images()} == before
    assert not os.path.isdir(f"/var/lib/labkit/layers/sha256/{top[7:]}")


def test_unknown_image_and_unreachable_registry(lab, registry):
    with pytest.raises(NotFound):
        lab.pull(f"{registry['host']}/nothing/here:v1")
    with pytest.raises(RegistryError, match="cannot reach"):
        lab.pull("127.0.0.1:1/x:v1")


# --- the Bearer token flow, against a registry that demands it --------------------------------------

def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """A token service for the test registry: it signs the JWT the registry's `auth: token` verifies
    (RS256, its certificate in the x5c header, the certificate in the registry's rootcertbundle). It
    gives tokens only for the right username and password, and only for the scope asked for."""

    def __init__(self, d, user="student", password="s3cret"):
        self.d, self.user, self.password = d, user, password
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=labkit-test-issuer",
                        "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem"], check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", f"{d}/cert.pem", "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.requests = []

    def token(self, service, scope, auth):
        ok = auth == "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        access = []
        if ok and scope:
            _, name, actions = scope.split(":")
            access = [{"type": "repository", "name": name, "actions": actions.split(",")}]
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {"iss": "labkit-test-issuer", "sub": self.user if ok else "", "aud": service, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", f"{self.d}/key.pem"], input=signing.encode(),
                             capture_output=True, check=True).stdout
        self.requests.append({"scope": scope, "granted": bool(access)})
        return f"{signing}.{_b64url(sig)}"


@pytest.fixture(scope="module")
def token_registry():
    d = tempfile.mkdtemp(prefix="labkit-registry-token-")
    issuer = TokenIssuer(d)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            tok = issuer.token(q.get("service", [""])[0], q.get("scope", [""])[0], self.headers.get("Authorization", ""))
            body = json.dumps({"token": tok}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    auth = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=auth.serve_forever, daemon=True).start()
    proc, port = start_registry(d, auth=f"auth:\n  token:\n    realm: http://127.0.0.1:{auth.server_address[1]}/token\n"
                                         f"    service: labkit-test-registry\n    issuer: labkit-test-issuer\n"
                                         f"    rootcertbundle: {d}/cert.pem\n")
    try:
        yield {"host": f"127.0.0.1:{port}", "issuer": issuer}
    finally:
        proc.terminate()
        proc.wait(10)
        auth.shutdown()
        shutil.rmtree(d, ignore_errors=True)


def test_bearer_tokens_are_fetched_and_used(lab, token_registry, built):
    ref = f"{token_registry['host']}/private/app:v1"
    lab.tag(built, ref)
    with pytest.raises(RegistryError, match="40[13]"):
        lab.push(ref, username="student", password="wrong")
    rec = lab.push(ref, username="student", password="s3cret")
    assert rec["facts"]["pushed_blobs"]
    assert any(r["granted"] and "push" in r["scope"] for r in token_registry["issuer"].requests)
    lab.rmi(ref)
    pulled = lab.pull(ref, username="student", password="s3cret")
    assert pulled["image"]["layers"] == lab.image(built)["layers"]
    token_steps = [s for s in pulled["steps"] if s.get("kind") == "http" and "/token" in s["url"]]
    assert token_steps, "the pull asked the token service for a token"


# --- hostile registries: small http.server registries on 127.0.0.0/8 that lie, redirect or flood --------
#
# A FakeRegistry answers from its own manifests and blobs, records every request it got (and the
# Authorization header it carried), and lets a test override any answer with a hook. Two of them on
# different ports (or on 127.0.0.1 and 127.0.0.2: the whole of 127/8 is loopback) stand for two hosts.

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MY_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
TOKEN = "fake-registry-token"


def _digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def base64_of(text):
    return base64.b64encode(text.encode()).decode()


def _tar(files):
    """An uncompressed layer tar holding ``files`` ({name: bytes})."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _fresh_tar():
    """A small layer no other test (or run) has: its digests are new to the store."""
    return _tar({f"hello-{os.urandom(4).hex()}": os.urandom(64).hex().encode()})


def _answer(h, status, body=b"", headers=None, length=True):
    """Send one answer from a request handler (no body for HEAD; no Content-Length when ``length`` is False,
    so the body ends when the connection closes). True: a hook returns it to say it answered."""
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    if length:
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)
    return True


def _redirect(h, url, status=307):
    return _answer(h, status, headers={"Location": url})


def _endless(h, start=b"", headers=None):
    """Answer 200 with ``start`` and then zeros without end (until the client hangs up; 256 MiB at most)."""
    h.send_response(200)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(start)
    for _ in range(256):
        h.wfile.write(bytes(1 << 20))
    return True


class _Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        # HTTPServer would look its address up (getfqdn): a reverse lookup of 127.0.0.2 may leave the machine
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class FakeRegistry:
    """A registry on ``ip`` (anywhere in 127.0.0.0/8), optionally named ``name`` (see ``loopback_names``) and
    speaking TLS. ``auth`` is None, "basic" (student/s3cret) or "bearer" (a token from ``realm``, by default
    its own /token). ``hook(handler, path)`` answers a request first when it returns True."""

    def __init__(self, ip="127.0.0.1", name=None, tls=None, auth=None):
        self.manifests, self.blobs, self.requests = {}, {}, []
        self.auth, self.hook = auth, None
        reg = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    reg._handle(self)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass  # the client hung up on an answer it refused: that is the point
            do_HEAD = do_POST = do_PUT = do_GET

            def log_message(self, *a):
                pass

        self.server = _Server((ip, 0), Handler)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.host = f"{name or ip}:{self.server.server_address[1]}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.realm = self.url + "/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def auth_seen(self):
        """The Authorization headers of every request, in order."""
        return [r["auth"] for r in self.requests]

    def _authorised(self, h):
        got = h.headers.get("Authorization")
        if self.auth == "basic":
            return got == "Basic " + base64_of("student:s3cret")
        if self.auth == "bearer":
            return got == "Bearer " + TOKEN
        return True

    def _handle(self, h):
        path = urllib.parse.urlsplit(h.path).path
        self.requests.append({"method": h.command, "path": h.path, "auth": h.headers.get("Authorization")})
        if h.command in ("PUT", "POST"):
            h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if path == "/token":
            return _answer(h, 200, json.dumps({"token": TOKEN}).encode(), {"Content-Type": "application/json"})
        if path.startswith("/v2/") and not self._authorised(h):
            challenge = 'Basic realm="fake"' if self.auth == "basic" else \
                f'Bearer realm="{self.realm}",service="fake"'
            return _answer(h, 401, b"{}", {"WWW-Authenticate": challenge})
        if self.hook and self.hook(h, path):
            return
        if path == "/v2/":
            return _answer(h, 200, b"{}")
        if "/manifests/" in path and path.rsplit("/", 1)[1] in self.manifests:
            body = self.manifests[path.rsplit("/", 1)[1]]
            return _answer(h, 200, body, {"Content-Type": json.loads(body)["mediaType"],
                                          "Docker-Content-Digest": _digest(body)})
        digest = path.rsplit("/", 1)[1]
        if path.startswith("/storage/"):
            digest = "sha256:" + digest
        if ("/blobs/" in path or path.startswith("/storage/")) and digest in self.blobs:
            return _answer(h, 200, self.blobs[digest], {"Content-Type": "application/octet-stream"})
        return _answer(h, 404, b'{"errors": [{"code": "NOT_FOUND"}]}')

    def add_image(self, repo, tag, tars=None, gz=True, layers=None, config_extra=None):
        """Serve repo:tag: an image of ``tars`` (layer tars, gzipped when ``gz``), or of ``layers`` given as
        (blob, mediaType, diff_id). Returns its ref, manifest digest and body, diff_ids and blob digests."""
        if layers is None:
            layers = [((gzip.compress(t, mtime=0) if gz else t), MT_LAYER + ("+gzip" if gz else ""), _digest(t))
                      for t in (tars or [_fresh_tar()])]
        for blob, _, _ in layers:
            self.blobs[_digest(blob)] = blob
        config = dict({"architecture": MY_ARCH, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                       "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]}}, **(config_extra or {}))
        cbody = json.dumps(config).encode()
        self.blobs[_digest(cbody)] = cbody
        manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": _digest(cbody), "size": len(cbody)},
                               "layers": [{"mediaType": mt, "digest": _digest(b), "size": len(b)}
                                          for b, mt, _ in layers]}).encode()
        self.manifests[tag] = self.manifests[_digest(manifest)] = manifest
        return {"ref": f"{self.host}/{repo}:{tag}", "repo": repo, "tag": tag, "digest": _digest(manifest),
                "manifest": manifest, "config": _digest(cbody), "diff_ids": [d for _, _, d in layers],
                "blobs": [_digest(b) for b, _, _ in layers]}


@pytest.fixture
def fakes():
    """Make FakeRegistry servers for one test; all are stopped at its end."""
    made = []

    def make(**kw):
        made.append(FakeRegistry(**kw))
        return made[-1]
    yield make
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def tls_cert():
    """A self-signed certificate for registry.test and storage.test: (cert, key)."""
    d = tempfile.mkdtemp(prefix="labkit-tls-")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=registry.test", "-addext", "subjectAltName=DNS:registry.test,DNS:storage.test",
                    "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem"], check=True, capture_output=True)
    yield f"{d}/cert.pem", f"{d}/key.pem"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def loopback_names(monkeypatch, tls_cert):
    """Names for https registries on loopback, in this process only: registry.test is 127.0.0.1 and
    storage.test is 127.0.0.2; every other name fails to resolve and every address outside 127/8 is refused
    (nothing leaves the machine). The test certificate is trusted (SSL_CERT_FILE) for the test."""
    names = {"registry.test": "127.0.0.1", "storage.test": "127.0.0.2"}
    real = socket.getaddrinfo

    def getaddrinfo(host, *a, **kw):
        host = host.decode() if isinstance(host, bytes) else host
        host = names.get(host, host)
        try:
            ok = ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8")
        except ValueError:
            ok = False
        if not ok:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: not resolved in this test")
        return real(host, *a, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("SSL_CERT_FILE", tls_cert[0])
    return tls_cert


@pytest.fixture
def store(monkeypatch):
    """What a pull leaves in /var/lib/labkit. ``leftovers(info)`` lists the work directories the pull made
    (tempfile.mkdtemp is watched) that still exist, and every store entry of the image's layers and blobs
    (unpacked, blob, temporaries) and of its image entry; ``forget(lab, info)`` removes a pulled image."""
    made = []
    real = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)

    class Store:
        @staticmethod
        def image_dir(info):
            return os.path.join(agent_store.IMAGES, *info["ref"].rsplit(":", 1)[0].split("/"))

        def leftovers(self, info):
            out = [d for d in made if os.path.exists(d)]
            for digest in info["diff_ids"] + info["blobs"]:
                for top in (agent_store.LAYERS, agent_store.BLOBS):
                    out += glob.glob(f"{top}/{digest[7:]}*") + glob.glob(f"{top}/.{digest[7:]}*")
            out += glob.glob(os.path.join(self.image_dir(info), f"*{info['tag']}*"))
            return out

        def forget(self, lab, info):
            _rmi(lab, info["ref"])
            for digest in info["diff_ids"]:
                shutil.rmtree(agent_store.layer_dir(digest), ignore_errors=True)
                for p in (agent_store.blob_path(digest), agent_store.layer_dir(digest) + ".json"):
                    if os.path.exists(p):
                        os.unlink(p)
    return Store()


def _rmi(lab, ref):
    """rmi, and the folders of the image's name under images/ with it when they are left empty."""
    lab.rmi(ref)
    d = os.path.join(agent_store.IMAGES, *ref.rsplit(":", 1)[0].split("/"))
    while d.startswith(agent_store.IMAGES + "/") and os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
        d = os.path.dirname(d)


def _refused(lab, store, info, error, match, **kw):
    """Pull ``info``'s image, expect ``error`` matching ``match``, and check that nothing of it was kept."""
    assert store.leftovers(info) == []
    with pytest.raises(error, match=match) as exc:
        lab.pull(info["ref"], **kw)
    assert exc.value.fix, "every refusal says what to do"
    assert store.leftovers(info) == [], "a refused pull left something in /var/lib/labkit"
    assert info["ref"] not in {i["ref"] for i in lab.images()}
    return exc.value


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_credentials_go_only_to_the_registry_and_blobs_follow_redirects_to_storage(lab, fakes, store, auth):
    """The registry redirects the config to another port of 127.0.0.1 and the layers to 127.0.0.2 (as real
    registries send blobs to S3): the pull works, and neither Basic nor Bearer reaches the other hosts."""
    reg, storage, other_port = fakes(auth=auth), fakes(ip="127.0.0.2"), fakes()
    info = reg.add_image("app/web", "v1", [_fresh_tar(), _fresh_tar()])
    storage.blobs = other_port.blobs = dict(reg.blobs)

    def hook(h, path):
        if "/blobs/" in path:
            digest = path.rsplit("/", 1)[1]
            target = other_port if digest == info["config"] else storage
            return _redirect(h, f"{target.url}/storage/{digest[7:]}?X-Amz-Signature=signed")
    reg.hook = hook
    pulled = lab.pull(info["ref"], username="student", password="s3cret")
    try:
        assert pulled["image"]["layers"] == info["diff_ids"]
        assert pulled["facts"]["digest"] == info["digest"]
        assert pulled["image"]["source"]["digest"] == info["digest"]
        assert any(r["path"].endswith(f"/manifests/{info['digest']}") and r["method"] == "GET" for r in reg.requests), \
            "the manifest was fetched by the digest the tag resolved to"
        assert len([s for s in pulled["steps"] if s.get("redirect")]) == 3
        want = "Basic " + base64_of("student:s3cret") if auth == "basic" else "Bearer " + TOKEN
        to_registry = [r["auth"] for r in reg.requests if r["path"].startswith("/v2/")]
        assert len(to_registry) >= 4 and all(a == want for a in to_registry[1:])
        assert len(storage.requests) == 2 and len(other_port.requests) == 1
        assert storage.auth_seen() == [None, None] and other_port.auth_seen() == [None], \
            "credentials followed a redirect to another host"
    finally:
        store.forget(lab, info)


def test_an_https_registry_redirects_to_https_storage_without_credentials_never_to_http(lab, fakes, store,
                                                                                       loopback_names):
    """registry.test (https, Basic auth) sends its blobs to storage.test: over https they are fetched without
    the credentials; a redirect to plain http is refused before anything is sent there."""
    reg = fakes(name="registry.test", tls=loopback_names, auth="basic")
    secure = fakes(ip="127.0.0.2", name="storage.test", tls=loopback_names)
    plain = fakes(ip="127.0.0.2", name="storage.test")
    target = {}

    def hook(h, path):
        if "/blobs/" in path:
            return _redirect(h, f"{target['url']}/storage/{path.rsplit(':', 1)[1]}")
    reg.hook = hook
    good = reg.add_image("secure/app", "v1")
    secure.blobs = dict(reg.blobs)
    target["url"] = secure.url
    pulled = lab.pull(good["ref"], username="student", password="s3cret")
    try:
        assert pulled["image"]["layers"] == good["diff_ids"]
        assert reg.requests and all(a for a in reg.auth_seen())
        assert secure.auth_seen() == [None, None]
    finally:
        store.forget(lab, good)
    bad = reg.add_image("secure/app", "v2")
    plain.blobs = dict(reg.blobs)
    target["url"] = plain.url
    _refused(lab, store, bad, RegistryError, "from https to plain http", username="student", password="s3cret")
    assert plain.requests == []


def test_a_plain_registry_may_not_lead_from_https_back_to_http(lab, fakes, store, loopback_names):
    """127.0.0.1 (plain http) redirects a blob to https://storage.test, which redirects it on to plain http:
    the https -> http hop is refused."""
    reg = fakes()
    hop = fakes(ip="127.0.0.2", name="storage.test", tls=loopback_names)
    last = fakes(ip="127.0.0.2")
    info = reg.add_image("hop/app", "v1")
    last.blobs = dict(reg.blobs)
    reg.hook = lambda h, path: "/blobs/" in path and _redirect(h, f"{hop.url}/hop/{path.rsplit(':', 1)[1]}")
    hop.hook = lambda h, path: path.startswith("/hop/") and _redirect(h, f"{last.url}/storage/{path.rsplit('/', 1)[1]}")
    _refused(lab, store, info, RegistryError, "from https to plain http")
    assert hop.requests and last.requests == []


@pytest.mark.parametrize("case", ["loop", "file", "put"])
def test_redirect_loops_and_non_http_redirects_are_refused(lab, fakes, store, case):
    """A blob that redirects forever (refused after MAX_REDIRECTS hops), a redirect to file:///etc/shadow,
    and a redirect answering a PUT of a push (labkit follows redirects for GET and HEAD only)."""
    reg = fakes()
    if case == "put":
        ref = f"{reg.host}/push/app:v1"
        lab.tag("busybox", ref)

        def hook(h, path):
            if h.command == "HEAD" and "/blobs/" in path:
                return _answer(h, 404)
            if h.command == "POST":
                return _answer(h, 202, headers={"Location": "/v2/push/app/blobs/uploads/1"})
            if h.command == "PUT":
                return _redirect(h, f"{reg.url}/elsewhere")
        reg.hook = hook
        try:
            with pytest.raises(RegistryError, match="redirect"):
                lab.push(ref)
        finally:
            _rmi(lab, ref)
        assert not any(r["path"].startswith("/elsewhere") for r in reg.requests)
        return
    info = reg.add_image("loop/app", "v1")

    def hook(h, path):
        if "/blobs/" in path:
            n = len(reg.requests)
            return _redirect(h, f"{reg.url}{path}?hop={n}" if case == "loop" else "file:///etc/shadow")
    reg.hook = hook
    _refused(lab, store, info, RegistryError, "more than 5 redirects" if case == "loop" else "not an http")
    blob_requests = [r for r in reg.requests if "/blobs/" in r["path"]]
    assert len(blob_requests) == (agent_registry.MAX_REDIRECTS + 1 if case == "loop" else 1)


@pytest.mark.parametrize("case", ["file", "ftp", "http-from-https", "https-elsewhere"])
def test_a_token_realm_must_be_https_or_plain_http_beside_a_plain_registry(lab, fakes, store, loopback_names, case,
                                                                          tmp_path):
    """The registry's Bearer challenge names the token service. file:// (a root-only file that holds a token)
    and ftp:// are refused, so is a plain-http realm of an https registry; an https realm on another host
    is used: the Basic credentials go to it (that is its job), its token only to the registry."""
    secret = tmp_path / "root-only-token.json"
    secret.write_text(json.dumps({"token": "read-from-a-root-only-file"}))
    os.chmod(secret, 0o600)
    if case in ("file", "ftp"):
        reg = fakes(auth="bearer")
        reg.realm = f"file://{secret}" if case == "file" else "ftp://127.0.0.1:1/token"
        realm = None
    else:
        reg = fakes(name="registry.test", tls=loopback_names, auth="bearer")
        realm = fakes(ip="127.0.0.2", name="storage.test", tls=loopback_names if case == "https-elsewhere" else None)
        reg.realm = realm.url + "/token"
    info = reg.add_image("private/app", "v1")
    if case == "https-elsewhere":
        pulled = lab.pull(info["ref"], username="student", password="s3cret")
        try:
            assert pulled["image"]["layers"] == info["diff_ids"]
            assert realm.auth_seen() == ["Basic " + base64_of("student:s3cret")]
            assert set(reg.auth_seen()[1:]) == {"Bearer " + TOKEN}
        finally:
            store.forget(lab, info)
        return
    _refused(lab, store, info, RegistryError, "token service \\(realm\\)", username="student", password="s3cret")
    assert not any(a and "read-from" in a for a in reg.auth_seen())
    assert len(reg.requests) == 1, "nothing but the first, unauthorised request reached the registry"
    if realm is not None:
        assert realm.requests == [], "the credentials went to a plain-http token service"


@pytest.mark.parametrize("host, plain", [
    ("localhost", True), ("localhost:5000", True), ("LOCALHOST:5000", True), ("127.0.0.1", True),
    ("127.0.0.1:5000", True), ("127.1.2.3:80", True), ("[::1]", True), ("[::1]:5000", True),
    ("127.evil.com", False), ("127.evil.com:5000", False), ("127.0.0.1.nip.io:5000", False),
    ("localhost.evil.com", False), ("127.1", False), ("0127.0.0.1", False), ("[::ffff:127.0.0.1]", False),
    ("128.0.0.1:5000", False), ("10.0.0.1:5000", False), ("registry.example.org", False)])
def test_only_localhost_and_literal_loopback_addresses_get_plain_http(host, plain):
    """No traffic: the scheme the client would use for each host. A name that begins with 127. is a name."""
    assert agent_registry.is_loopback(host) is plain
    assert agent_registry.Session(host, "x").base == ("http://" if plain else "https://") + host


@pytest.mark.parametrize("host", ["evil.com@127.0.0.1:5000", "127.0.0.1:5000/v2/x?", "::1", "127.0.0.1:99999",
                                  "127.0.0.1 :5000", "[evil.com]"])
def test_a_registry_host_that_is_more_than_host_and_port_is_refused(lab, host):
    with pytest.raises(InvalidSpec, match="host\\[:port\\]"):
        lab.search("x", registry=host)


@pytest.mark.parametrize("case", ["announced", "endless"])
def test_an_oversized_manifest_is_refused(lab, fakes, store, monkeypatch, case):
    """A manifest above MAX_MANIFEST_BYTES (lowered to 64 KiB): announced by its Content-Length, or sent
    without one and without end."""
    monkeypatch.setattr(agent_registry, "MAX_MANIFEST_BYTES", 64 << 10)
    reg = fakes()
    info = reg.add_image("big/app", "v1")
    big = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST, "pad": "x" * (200 << 10)}).encode()

    def hook(h, path):
        if "/manifests/" in path:
            if case == "announced":
                return _answer(h, 200, big, {"Content-Type": MT_MANIFEST})
            return _endless(h, big[:100], {"Content-Type": MT_MANIFEST})
    reg.hook = hook
    _refused(lab, store, info, RegistryError, "more than the 65536 bytes|65536 labkit accepts")


@pytest.mark.parametrize("case", ["endless", "longer", "short", "layer-too-big", "config-too-big"])
def test_a_blob_must_be_exactly_the_size_its_descriptor_declares(lab, fakes, store, monkeypatch, case):
    """The layer blob goes on without end after its bytes, or its Content-Length and body are longer than
    its descriptor's size, or it stops short; or a descriptor declares a layer above MAX_BLOB_BYTES or a
    config above MAX_MANIFEST_BYTES (both refused before a byte is fetched)."""
    reg = fakes()
    extra = {"history": [{"created_by": "x" * (100 << 10)}]} if case == "config-too-big" else None
    info = reg.add_image("size/app", "v1", [_tar({"f": os.urandom(8 << 10)})], config_extra=extra)
    layer = info["blobs"][0]
    data = reg.blobs[layer]
    if case == "layer-too-big":
        monkeypatch.setattr(agent_registry, "MAX_BLOB_BYTES", len(data) - 1)
    if case == "config-too-big":
        monkeypatch.setattr(agent_registry, "MAX_MANIFEST_BYTES", 64 << 10)

    def hook(h, path):
        if path.endswith(layer):
            if case == "endless":
                return _endless(h, data)
            if case == "longer":
                return _answer(h, 200, data + b"more")
            if case == "short":
                return _answer(h, 200, data[:len(data) // 2], length=False)
    reg.hook = hook
    match = {"endless": "sent more of layer 1", "longer": "announces layer 1", "short": "ended after",
             "layer-too-big": "layer 1 .* declares", "config-too-big": "config .* declares"}[case]
    _refused(lab, store, info, UnsafeLayer, match)
    if case.endswith("too-big"):
        fetched = [r["path"] for r in reg.requests if "/blobs/" in r["path"]]
        assert fetched == [], "a blob above the limit was fetched"


@pytest.mark.parametrize("case", ["ratio", "ceiling", "xz-as-tar", "bzip2-in-gzip", "lzma-as-tar"])
def test_a_compression_bomb_is_refused(lab, fakes, store, monkeypatch, case):
    """A gzip layer of 32 MiB of zeros (about 1000:1; GZIP_FREE_BYTES lowered to 64 KiB, the ratio limit is
    100); an incompressible gzip layer above MAX_LAYER_BYTES (lowered to 256 KiB); an xz stream declared as
    a plain tar; a bzip2 stream inside the gzip; a legacy .lzma stream (no signature) declared as a plain
    tar. The tar reader would decompress the last three itself, without a bound: only a plain tar may come
    out of the gzip."""
    reg = fakes()
    if case == "ratio":
        monkeypatch.setattr(agent_registry, "GZIP_FREE_BYTES", 64 << 10)
        tar = _tar({"zeros": bytes(32 << 20)})
        layers = [(gzip.compress(tar, 9), MT_LAYER + "+gzip", _digest(tar))]
    elif case == "ceiling":
        monkeypatch.setattr(agent_registry, "MAX_LAYER_BYTES", 256 << 10)
        tar = _tar({"noise": os.urandom(1 << 20)})
        layers = [(gzip.compress(tar), MT_LAYER + "+gzip", _digest(tar))]
    elif case == "xz-as-tar":
        tar = _tar({"zeros": bytes(1 << 20)})
        blob = lzma.compress(tar)
        layers = [(blob, MT_LAYER, _digest(blob))]
    elif case == "bzip2-in-gzip":
        tar = _tar({"zeros": bytes(1 << 20)})
        blob = bz2.compress(tar)
        layers = [(gzip.compress(blob), MT_LAYER + "+gzip", _digest(blob))]
    else:
        tar = _tar({"zeros": bytes(1 << 20)})
        blob = lzma.compress(tar, format=lzma.FORMAT_ALONE)
        layers = [(blob, MT_LAYER, _digest(blob))]
    first = _fresh_tar()
    info = reg.add_image("bomb/app", "v1", layers=[(first, MT_LAYER, _digest(first))] + layers)
    match = {"ratio": "decompresses to more than .* gzip bomb", "ceiling": "decompresses to more than 262144",
             "xz-as-tar": "holds a compressed stream \\(xz\\)",
             "bzip2-in-gzip": "holds a compressed stream \\(bzip2\\)", "lzma-as-tar": "is not a tar archive"}[case]
    _refused(lab, store, info, UnsafeLayer, "layer 2 " + match)


def _manifest_of(body):
    return {"mediaType": MT_MANIFEST, "digest": _digest(body), "size": len(body),
            "platform": {"os": "linux", "architecture": MY_ARCH}}


@pytest.mark.parametrize("case", ["second-answer-differs", "header-lies", "index-entry-differs"])
def test_the_manifest_digest_is_pinned_for_the_whole_pull(lab, fakes, store, case):
    """The registry answers the tag honestly once, then serves another (valid, pullable) image's manifest on
    every later manifest request, each with an honest Docker-Content-Digest; or, without HEAD, sends the
    other manifest with the first one's Docker-Content-Digest; or serves an index whose entry for this CPU
    is answered, by digest, with the other manifest."""
    reg = fakes()
    info = reg.add_image("pin/app", "v1")
    other = reg.add_image("pin/app", "evil")
    evil = other["manifest"]
    if case == "index-entry-differs":
        index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [_manifest_of(info["manifest"])]})
        reg.manifests["v1"] = reg.manifests[_digest(index.encode())] = index.encode()
    seen = []

    def hook(h, path):
        if "/manifests/" not in path:
            return False
        ref = path.rsplit("/", 1)[1]
        if case == "second-answer-differs":
            seen.append(ref)
            if len(seen) > 1:
                return _answer(h, 200, evil, {"Content-Type": MT_MANIFEST, "Docker-Content-Digest": _digest(evil)})
        if case == "header-lies":
            if h.command == "HEAD":
                return _answer(h, 405)
            return _answer(h, 200, evil, {"Content-Type": MT_MANIFEST,
                                          "Docker-Content-Digest": info["digest"]})
        if case == "index-entry-differs" and ref == info["digest"]:
            return _answer(h, 200, evil, {"Content-Type": MT_MANIFEST})
        return False
    reg.hook = hook
    match = "said the manifest .* is " + info["digest"] if case == "header-lies" else \
        f"whose sha256 is {other['digest']}, not the {info['digest']} it promised"
    _refused(lab, store, info, UnsafeLayer, match)
    assert store.leftovers(other) == [], "nothing of the other image was fetched into the store either"
    assert not any(other["config"] in r["path"] for r in reg.requests)


def test_a_refused_layer_takes_the_earlier_layers_of_its_pull_with_it(lab, fakes, store):
    """Layer 1 is fine, layer 2 climbs out with '..' (refused by tarsafe while it goes into the store):
    layer 1, already unpacked by this pull, is removed again; no image entry is written."""
    reg = fakes()
    info = reg.add_image("half/app", "v1", [_fresh_tar(), _tar({"../escape": b"x"})])
    _refused(lab, store, info, UnsafeLayer, "escape")


def test_push_sends_credentials_to_the_registry_only(lab, fakes):
    """The registry (Basic auth) hands out upload locations on 127.0.0.2: the blobs go there without the
    credentials, the manifest goes to the registry with them."""
    reg, storage = fakes(auth="basic"), fakes(ip="127.0.0.2")
    ref = f"{reg.host}/pushed/app:v1"
    lab.tag("busybox", ref)

    def reg_hook(h, path):
        if h.command == "HEAD":
            return _answer(h, 404)
        if h.command == "POST":
            return _answer(h, 202, headers={"Location": f"{storage.url}/upload/{len(reg.requests)}"})
        if h.command == "PUT":
            return _answer(h, 201)
    reg.hook = reg_hook
    storage.hook = lambda h, path: h.command == "PUT" and _answer(h, 201)
    try:
        rec = lab.push(ref, username="student", password="s3cret")
    finally:
        _rmi(lab, ref)
    assert len(rec["facts"]["pushed_blobs"]) == len([r for r in storage.requests if r["method"] == "PUT"]) >= 2
    assert storage.auth_seen() and all(a is None for a in storage.auth_seen())
    assert all(a == "Basic " + base64_of("student:s3cret") for a in reg.auth_seen())
    assert any(r["method"] == "PUT" and "/manifests/v1" in r["path"] for r in reg.requests)


def test_a_prune_during_a_push_is_refused_not_run_under_it(lab, fakes):
    """A push reads the image's layers while it talks to the registry: it holds the store's lock shared, so a
    prune asked for meanwhile (here from the registry's own handler, mid-push) is refused with Conflict, and
    one after the push runs."""
    from labkit.wire.errors import Conflict
    reg = fakes()
    ref = f"{reg.host}/pushed/locked:v1"
    lab.tag("busybox", ref)
    seen = []

    def hook(h, path):
        if h.command == "HEAD":
            if not seen:
                try:
                    agent_store.prune()
                    seen.append("pruned under the push")
                except Conflict as exc:
                    seen.append(str(exc))
            return _answer(h, 200)  # every blob is there already: nothing to upload
        if h.command == "PUT":
            return _answer(h, 201)
    reg.hook = hook
    try:
        lab.push(ref)
    finally:
        _rmi(lab, ref)
    assert seen and "store is busy" in seen[0], seen
    agent_store.prune()  # (and no lock is left behind)


def test_a_registry_dripping_bytes_is_cut_off_by_the_transfer_deadline(lab, fakes, store, monkeypatch):
    """A byte every 0.2 s keeps every single read alive (no socket timeout fires): the whole pull may take
    MAX_TRANSFER_SECONDS (lowered to 1 s here), then it is refused and leaves nothing."""
    reg = fakes()
    info = reg.add_image("slow/app", "v1")
    monkeypatch.setattr(agent_registry, "MAX_TRANSFER_SECONDS", 1)

    def drip(h, path):
        if "/blobs/" in path:  # the true content at its true length, a byte at a time
            body = reg.blobs[path.rsplit("/", 1)[1]]
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            for b in body[:50]:
                h.wfile.write(bytes([b]))
                h.wfile.flush()
                time.sleep(0.2)
            return True
    reg.hook = drip
    started = time.monotonic()
    _refused(lab, store, info, RegistryError, "took longer than 1 s")
    assert time.monotonic() - started < 8
