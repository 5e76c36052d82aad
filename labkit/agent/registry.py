"""A client for the OCI distribution API: pull and push images to a registry.

``pull(ref)`` asks the registry for the manifest (an OCI image index or Docker manifest list is
resolved to the manifest for this machine's CPU: amd64, arm64, ...), then fetches the config and each
layer, verifying every blob's sha256 against the digest it was asked for before the layer goes through
:func:`labkit.agent.tarsafe.unpack` (a registry that lies about a digest is refused, nothing is kept).
``push(ref)`` uploads the blobs the registry lacks (HEAD, then POST + PUT), then the manifest.
Authentication: anonymous, HTTP basic, and the Bearer token flow (``WWW-Authenticate: Bearer realm=...``)
that Docker Hub and most registries use. Plain HTTP is used for localhost/127.0.0.1 registries (as
Docker treats them as insecure registries); HTTPS everywhere else. Standard library only.
"""
import base64
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from ..errors import InvalidSpec, LabkitError, NotFound, RegistryError, UnsafeLayer
from ..specs import STATE_DIR, ImageRef
from . import images
from .runner import Recorder

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
ACCEPT = ", ".join([MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST])
ARCH = {"x86_64": ("amd64", None), "aarch64": ("arm64", "v8"), "armv7l": ("arm", "v7")}


def _insecure(host):
    return host.split(":")[0] in ("localhost", "127.0.0.1") or host.startswith("127.")


class Session:
    """One registry host: base URL, credentials, and the bearer tokens obtained per scope."""

    def __init__(self, host, repo, username=None, password=None, rec=None, timeout=60):
        self.host, self.repo, self.timeout = host, repo, timeout
        self.base = ("http://" if _insecure(host) else "https://") + host
        self.basic = None
        if username is not None:
            self.basic = "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        self.token = None
        self.rec = rec or Recorder("registry")

    def request(self, method, path, data=None, headers=None, scope="pull", stream=False, ok=(200, 201, 202, 204)):
        url = path if path.startswith("http") else self.base + path
        for attempt in range(2):
            h = dict(headers or {})
            if self.token:
                h["Authorization"] = "Bearer " + self.token
            elif self.basic:
                h["Authorization"] = self.basic
            req = urllib.request.Request(url, data=data, method=method, headers=h)
            start = time.perf_counter()
            try:
                resp = urllib.request.urlopen(req, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                self.rec.add({"kind": "http", "method": method, "url": url, "status": exc.code,
                              "duration": time.perf_counter() - start})
                if exc.code == 401 and attempt == 0 and self._authenticate(exc.headers.get("WWW-Authenticate", ""), scope):
                    continue
                if exc.code in ok:
                    return exc
                body = exc.read()[:500].decode("utf-8", "replace")
                if exc.code == 404:
                    raise NotFound(f"{self.host}/{self.repo}: {method} {urllib.parse.urlparse(url).path} -> 404 {body}",
                                   fix="check the image name and tag (labkit images / the registry's catalog)")
                raise RegistryError(f"{self.host}: {method} {url} -> {exc.code} {body}",
                                    fix="check the name, the credentials, and that the registry is running")
            except (urllib.error.URLError, OSError) as exc:
                raise RegistryError(f"cannot reach the registry {self.host}: {exc}",
                                    fix="check the address and that the registry runs; labkit needs no registry "
                                        "for the course (the busybox image is built in)") from None
            self.rec.add({"kind": "http", "method": method, "url": url, "status": resp.status,
                          "duration": time.perf_counter() - start})
            return resp
        raise RegistryError(f"{self.host}: not authorised for {self.repo} ({scope})",
                            fix="log in with username/password, or check that the repository exists")

    def _authenticate(self, challenge, scope):
        if challenge.lower().startswith("basic"):
            return False  # the credentials (if any) were sent already: a second try would be the same
        m = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if not challenge.lower().startswith("bearer") or "realm" not in m:
            return False
        params = {"service": m.get("service", ""), "scope": f"repository:{self.repo}:{scope}"}
        url = m["realm"] + "?" + urllib.parse.urlencode(params)
        h = {"Authorization": self.basic} if self.basic else {}
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=h), timeout=self.timeout) as r:
                body = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RegistryError(f"the token service {m['realm']} refused: {exc}",
                                fix="check the credentials for this registry") from None
        self.rec.add({"kind": "http", "method": "GET", "url": url, "status": 200, "duration": time.perf_counter() - start})
        self.token = body.get("token") or body.get("access_token")
        return bool(self.token)


def _sha256_stream(resp, out_path):
    h = hashlib.sha256()
    with open(out_path, "wb") as f:
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            f.write(chunk)
    return "sha256:" + h.hexdigest()


def _verify(digest, got, what):
    if got != digest:
        raise UnsafeLayer(f"the registry sent {what} whose sha256 is {got}, not the {digest} it promised",
                          fix="the registry (or something between) altered the content: nothing of it was kept")


def _pick_platform(index):
    arch, variant = ARCH.get(platform.machine(), (platform.machine(), None))
    for m in index.get("manifests", []):
        p = m.get("platform") or {}
        if p.get("os") == "linux" and p.get("architecture") == arch and (variant is None or p.get("variant") in (None, variant)):
            return m["digest"]
    offered = ", ".join(f"{(m.get('platform') or {}).get('os')}/{(m.get('platform') or {}).get('architecture')}"
                        for m in index.get("manifests", []))
    raise NotFound(f"the image has no build for linux/{arch} (it offers {offered})",
                   fix="use an image built for this CPU, or build one with `labkit build`")


def pull(ref, username=None, password=None):
    """Pull ``ref`` ([host/]name[:tag]) into the local store; returns the image and the HTTP record."""
    ref = ImageRef.parse(ref)
    host, repo = ref.registry
    rec = Recorder(f"pull {ref}")
    s = Session(host, repo, username, password, rec)
    resp = s.request("GET", f"/v2/{repo}/manifests/{ref.tag}", headers={"Accept": ACCEPT})
    body = resp.read()
    mt = resp.headers.get("Content-Type", "").split(";")[0]
    manifest = json.loads(body)
    mt = manifest.get("mediaType") or mt
    if mt in (MT_OCI_INDEX, MT_DOCKER_LIST) or "manifests" in manifest:
        digest = _pick_platform(manifest)
        resp = s.request("GET", f"/v2/{repo}/manifests/{digest}", headers={"Accept": ACCEPT})
        body = resp.read()
        _verify(digest, "sha256:" + hashlib.sha256(body).hexdigest(), "a manifest")
        manifest = json.loads(body)
    work = tempfile.mkdtemp(prefix="pull-", dir=STATE_DIR)
    try:
        cpath = os.path.join(work, "config")
        cd = manifest["config"]["digest"]
        _verify(cd, _sha256_stream(s.request("GET", f"/v2/{repo}/blobs/{cd}"), cpath), "a config")
        config = json.loads(open(cpath).read())
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        layers = []
        for i, desc in enumerate(manifest.get("layers", [])):
            blob = os.path.join(work, f"layer{i}")
            _verify(desc["digest"], _sha256_stream(s.request("GET", f"/v2/{repo}/blobs/{desc['digest']}"), blob),
                    f"layer {i + 1}")
            if "gzip" in desc.get("mediaType", "") or _is_gzip(blob):
                tar = blob + ".tar"
                with gzip.open(blob, "rb") as src, open(tar, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                want = diff_ids[i] if i < len(diff_ids) else None
                layers.append(images.add_layer_tar(tar, want))
            else:
                layers.append(images.add_layer_tar(blob, desc["digest"]))
        c = config.get("config") or {}
        cmd = (c.get("Entrypoint") or []) + (c.get("Cmd") or []) or ["/bin/sh"]
        image = {"layers": layers, "config": {"Env": c.get("Env") or images.DEFAULT_ENV, "Cmd": cmd,
                                              "WorkingDir": c.get("WorkingDir") or "/"},
                 "history": config.get("history", []), "created": time.time(),
                 "source": {"registry": host, "repository": repo, "tag": ref.tag}}
        saved = images.save_image(ref, image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rec.to_dict(image=saved)


def _is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def push(ref, username=None, password=None):
    """Push local image ``ref`` (its name says where: host/repo:tag) to its registry."""
    ref = ImageRef.parse(ref)
    host, repo = ref.registry
    if host == "registry-1.docker.io" and username is None:
        raise InvalidSpec(f"pushing {ref} would go to Docker Hub", fix="tag it for your registry first, e.g. "
                          f"labkit tag {ref} 127.0.0.1:5000/{ref.name}:{ref.tag}")
    image = images.load_image(ref)
    rec = Recorder(f"push {ref}")
    s = Session(host, repo, username, password, rec)
    config = json.dumps(images.oci_config(image), sort_keys=True).encode()
    cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
    blobs = [(d, images.blob_path(d)) for d in image["layers"]]
    pushed = []
    for digest, path in blobs + [(cdigest, None)]:
        head = s.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope="pull,push", ok=(200, 404))
        if getattr(head, "status", getattr(head, "code", 0)) == 200:
            continue
        start = s.request("POST", f"/v2/{repo}/blobs/uploads/", data=b"", scope="pull,push")
        loc = start.headers["Location"]
        if not loc.startswith("http"):
            loc = s.base + loc
        loc += ("&" if "?" in loc else "?") + urllib.parse.urlencode({"digest": digest})
        data = config if path is None else open(path, "rb").read()
        s.request("PUT", loc, data=data, headers={"Content-Type": "application/octet-stream"}, scope="pull,push")
        pushed.append(digest)
    manifest = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": len(config)},
                "layers": [{"mediaType": MT_OCI_LAYER, "digest": d, "size": os.path.getsize(p)} for d, p in blobs]}
    body = json.dumps(manifest, sort_keys=True).encode()
    resp = s.request("PUT", f"/v2/{repo}/manifests/{ref.tag}", data=body,
                     headers={"Content-Type": MT_OCI_MANIFEST}, scope="pull,push")
    rec.fact("pushed_blobs", pushed)
    rec.fact("manifest", resp.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest())
    return rec.to_dict(ref=str(ref))


def search(term, host="127.0.0.1:5000"):
    """Repositories in a registry's catalog whose name contains ``term`` (the registry API has no search)."""
    s = Session(host, "", rec=Recorder(f"search {term}"))
    repos = json.loads(s.request("GET", "/v2/_catalog").read()).get("repositories", [])
    return [r for r in repos if term in r]


__all__ = ["pull", "push", "search", "RegistryError", "LabkitError"]
