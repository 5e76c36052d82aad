"""pull and push against a real registry (Debian's docker-registry on 127.0.0.1), and skopeo both ways."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from labkit.errors import NotFound, UnsafeLayer

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
            lab.rmi(ref)
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


def test_pull_what_skopeo_pushed(lab, registry, built, tmp_path):
    lab.export_image(built, str(tmp_path / "layout"))
    ref = f"{registry['host']}/from/skopeo:v2"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path}/layout:v1", f"docker://{ref}")
    pulled = lab.pull(ref)
    assert pulled["image"]["layers"] == lab.image(built)["layers"]


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
    import platform
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
    from labkit.errors import RegistryError
    with pytest.raises(RegistryError, match="cannot reach"):
        lab.pull("127.0.0.1:1/x:v1")


# --- the Bearer token flow, against a registry that demands it --------------------------------------

def _b64url(data):
    import base64
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
        import base64
        self.x5c = base64.b64encode(der).decode()
        self.requests = []

    def token(self, service, scope, auth):
        import base64
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
    import http.server
    import threading
    import urllib.parse
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
    from labkit.errors import RegistryError
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
