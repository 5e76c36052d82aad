"""A client for the OCI distribution API: pull and push images to a registry.

``pull(ref)`` resolves the tag to a manifest digest (``HEAD``, the ``Docker-Content-Digest`` header; or the
sha256 of the tag's manifest when the registry gives none) and from then on asks only by digest: the
manifest, the index entry for this machine's CPU (amd64, arm64, ...), the config and each layer. Every
answer is checked against the digest it was asked for before anything is kept, and a layer goes into the
store only through :func:`labkit.agent.store.add_layer_tar` (that is, :func:`labkit.agent.tarsafe.unpack`).
``push(ref)`` uploads the blobs the registry lacks (HEAD, then POST + PUT), then the manifest.
Authentication: anonymous, HTTP basic, and the Bearer token flow (``WWW-Authenticate: Bearer realm=...``)
that Docker Hub and most registries use.

The agent is root and the registry is a stranger, so a pull refuses, with a typed error that names the
problem and leaves nothing half made in /var/lib/labkit (no partial blob, layer or image entry):

- plain HTTP anywhere but ``localhost`` and literal loopback addresses (127.0.0.0/8, ``[::1]``, with or
  without a port; ``127.evil.com`` is a name, not an address, and gets HTTPS). Docker treats the same
  loopback registries as insecure registries (:func:`is_loopback`);
- redirects followed blindly: labkit follows at most ``MAX_REDIRECTS`` itself, only for GET and HEAD, never
  from https to http, and sends credentials (Basic or Bearer) only to the registry's own scheme, host and
  port. A blob redirected to a storage host (as registries do to S3) is fetched there without them;
- a token realm that is not an http(s) URL (``file://`` ...), or a plain-http realm unless the registry
  itself is a plain-http loopback registry;
- answers without bounds: a manifest, index, image config, catalog or token answer above
  ``MAX_MANIFEST_BYTES``; a blob whose bytes differ in number from its descriptor's ``size``, or whose
  ``size`` is above ``MAX_BLOB_BYTES``; more than ``MAX_LAYERS`` layers; a gzip layer that decompresses to
  more than ``GZIP_MAX_RATIO`` times its size (beyond a first ``GZIP_FREE_BYTES``) or to more than
  ``MAX_LAYER_BYTES`` (a gzip bomb); a layer that is not a plain tar once gunzipped (an xz or bzip2 stream
  would be decompressed, unbounded, by the tar reader);
- content that does not match: a manifest whose sha256 is not the digest asked for or the
  ``Docker-Content-Digest`` given (a registry answering differently on a second request), a blob whose
  sha256 is not its digest, a layer whose uncompressed sha256 is not the config's ``diff_id``.

The limits are module constants (tests lower them). Refusals about the registry's behaviour (redirects,
realms, malformed or oversized manifests) raise :class:`RegistryError`; refusals about content (digests,
sizes, bombs) raise :class:`UnsafeLayer`. Standard library only.
"""
import base64
import contextlib
import hashlib
import http.client
import ipaddress
import json
import os
import platform
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from ..wire.errors import InvalidSpec, LabkitError, NotFound, RegistryError, UnsafeLayer
from ..wire.specs import STATE_DIR, ImageRef
from . import oci, store, tarsafe
from .runner import Recorder

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
ACCEPT = ", ".join([MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST])
ARCH = {"x86_64": ("amd64", None), "aarch64": ("arm64", "v8"), "armv7l": ("arm", "v7")}

MAX_REDIRECTS = 5              # hops followed for one request
MAX_MANIFEST_BYTES = 4 << 20   # a manifest, an index, an image config, the catalog, a token answer
MAX_BLOB_BYTES = 8 << 30       # one layer blob as sent (its descriptor's size must match it exactly)
MAX_LAYER_BYTES = 16 << 30     # one layer once decompressed
GZIP_MAX_RATIO = 100           # decompressed / compressed size of a gzip layer ...
GZIP_FREE_BYTES = 16 << 20     # ... beyond this much, which any layer may decompress to (tiny layers compress well)
MAX_LAYERS = 128               # layers of one image (Docker's overlay2 stops at 128 too)
MAX_TRANSFER_SECONDS = 3600    # one pull, push or search as a whole: a registry dripping a byte a minute stops here
CHUNK = 1 << 20

REDIRECTS = (301, 302, 303, 307, 308)
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]{1,16384}")
_LOOPBACK4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK6 = ipaddress.ip_address("::1")


# --- hosts and URLs ------------------------------------------------------------------------------

def _split_host(host):
    """(hostname, port) of ``host[:port]`` or ``[v6]:port``; InvalidSpec for anything more (a path, user@...)."""
    bad = InvalidSpec(f"registry host {host!r} is not host[:port]",
                      fix="e.g. 127.0.0.1:5000, localhost:5000, [::1]:5000 or registry.example.org")
    if not isinstance(host, str) or not host or any(c in host for c in "/?#@\\%") or \
            any(ord(c) <= 32 or ord(c) >= 127 for c in host):
        raise bad
    try:
        parts = urllib.parse.urlsplit("//" + host)
        port = parts.port
    except ValueError:
        raise bad from None
    name = parts.hostname
    if not name or (":" in name and not host.startswith("[")) or (host.startswith("[") and ":" not in name):
        raise bad
    return name, port


def is_loopback(host):
    """True when ``host`` ([name or address][:port]) is this machine without a doubt: ``localhost``, a
    literal IPv4 address inside 127.0.0.0/8 in its usual spelling, or ``[::1]``. Only these registries are
    spoken to in plain HTTP; a name such as ``127.evil.com`` is resolved by DNS and may be anywhere."""
    name, _ = _split_host(host)
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if ip.version == 4:
        return str(ip) == name and ip in _LOOPBACK4  # '0127.0.0.1' would be octal to the resolver
    return ip == _LOOPBACK6 and str(ip) == name


def _origin(url):
    """(scheme, host, port) of a URL: credentials go only to the origin they were given for."""
    p = urllib.parse.urlsplit(url)
    return p.scheme, p.hostname, p.port or (443 if p.scheme == "https" else 80)


class _Response:
    """What one request ended with: the open response (or HTTP error, which is a response too), its status,
    the URL that answered (after redirects) and its headers."""

    def __init__(self, raw, status, url):
        self.raw, self.status, self.url, self.headers = raw, status, url, raw.headers

    def read(self, n):
        # read1: what one receive brings, so that a registry dripping bytes meets the deadline between reads
        return self.raw.read1(n) if hasattr(self.raw, "read1") else self.raw.read(n)

    def close(self):
        try:
            self.raw.close()
        except (OSError, http.client.HTTPException):
            pass


def _opener():
    """An opener for http and https only, that follows no redirect (:meth:`Session._send` does, by hand)."""
    o = urllib.request.OpenerDirector()
    for h in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
              urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        o.add_handler(h)
    return o


class Session:
    """One registry host: base URL, credentials, and the bearer token obtained for it."""

    def __init__(self, host, repo, username=None, password=None, rec=None, timeout=60):
        self.host, self.repo, self.timeout = host, repo, timeout
        _split_host(host)
        self.plain = is_loopback(host)
        self.base = ("http://" if self.plain else "https://") + host
        self.origin = _origin(self.base)
        self.basic = None
        if username is not None:
            self.basic = "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        self.token = None
        self.rec = rec or Recorder("registry")
        self.opener = _opener()

    def _check_url(self, url, what):
        """Refuse a URL labkit will not send a request to: not http(s), user@host, or plain http from an
        https registry (a downgrade)."""
        try:
            p = urllib.parse.urlsplit(url)
            p.port
        except ValueError:
            p = None
        if p is None or p.scheme not in ("http", "https") or not p.hostname or p.username is not None \
                or any(ord(c) <= 32 or ord(c) == 127 for c in url):
            raise RegistryError(f"{self.host}: {what} {url[:200]!r} is not an http(s) URL labkit will use",
                                fix="a registry may only point to http(s) URLs: do not use this registry")
        if p.scheme == "http" and not self.plain:
            raise RegistryError(f"{self.host} is an https registry, but {what} {url[:200]!r} is plain http: "
                                f"labkit refuses the downgrade",
                                fix="the registry (or something in between) must keep to https; do not use it "
                                    "until it does")

    def _send(self, method, url, data=None, headers=None, cred=None, cred_origin=None, what="the URL"):
        """Send one request and follow its redirects by hand (GET and HEAD only, at most MAX_REDIRECTS, never
        from https to http). ``cred`` goes in the Authorization header only to ``cred_origin``."""
        for hop in range(MAX_REDIRECTS + 1):
            self._check_url(url, what if hop == 0 else "a redirect to")
            h = dict(headers or {})
            if cred and _origin(url) == cred_origin:
                h["Authorization"] = cred
            start = time.perf_counter()
            try:
                raw = self.opener.open(urllib.request.Request(url, data=data, method=method, headers=h),
                                       timeout=self.timeout)
                status = raw.status
            except urllib.error.HTTPError as exc:
                raw, status = exc, exc.code
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
                raise RegistryError(f"cannot reach the registry {self.host} ({urllib.parse.urlsplit(url).netloc}): "
                                    f"{exc}",
                                    fix="check the address and that the registry runs; labkit needs no registry "
                                        "for the course (the busybox image is built in)") from None
            step = self.rec.add({"kind": "http", "method": method, "url": url, "status": status,
                                 "duration": time.perf_counter() - start})
            resp = _Response(raw, status, url)
            if status not in REDIRECTS:
                return resp
            location = resp.headers.get("Location") or ""
            resp.close()
            if method not in ("GET", "HEAD"):
                raise RegistryError(f"{self.host} answered {method} {url} with a redirect ({status})",
                                    fix="labkit follows redirects only for GET and HEAD; push to the registry "
                                        "itself")
            if not location:
                raise RegistryError(f"{self.host} answered {method} {url} with {status} but no Location",
                                    fix="the registry is broken: do not use it")
            nxt = urllib.parse.urljoin(url, location)
            step["redirect"] = nxt
            if urllib.parse.urlsplit(url).scheme == "https" and urllib.parse.urlsplit(nxt).scheme != "https":
                raise RegistryError(f"{url} redirects to {nxt[:200]!r}: labkit refuses to go from https to "
                                    f"plain http",
                                    fix="the registry (or something in between) must keep to https; do not use "
                                        "it until it does")
            url = nxt
        raise RegistryError(f"{self.host}: {method} went through more than {MAX_REDIRECTS} redirects",
                            fix="the registry redirects in a loop: do not use it")

    def request(self, method, path, data=None, headers=None, scope="pull", ok=(200, 201, 202, 204)):
        """``method`` on a path of this registry (or a URL it gave, such as an upload location); returns the
        response when its status is in ``ok``, else raises NotFound (404) or RegistryError. A 401 from the
        registry itself is answered once with a Bearer token (see :meth:`_authenticate`)."""
        url = urllib.parse.urljoin(self.base + "/", path)
        for attempt in (0, 1):
            cred = "Bearer " + self.token if self.token else self.basic
            resp = self._send(method, url, data, headers, cred, self.origin, what="the URL")
            if resp.status in ok:
                return resp
            where = urllib.parse.urlsplit(resp.url).path
            if resp.status == 401:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.close()
                if attempt == 0 and _origin(resp.url) == self.origin and self._authenticate(challenge, scope):
                    continue
                raise RegistryError(f"{self.host}: {method} {where} -> 401: not authorised for {self.repo} ({scope})",
                                    fix="log in with username/password, or check that the repository exists")
            try:
                body = resp.read(500).decode("utf-8", "replace")
            except (OSError, http.client.HTTPException):
                body = ""
            resp.close()
            if resp.status == 404:
                raise NotFound(f"{self.host}/{self.repo}: {method} {where} -> 404 {body}",
                               fix="check the image name and tag (labkit images / the registry's catalog)")
            raise RegistryError(f"{self.host}: {method} {where} -> {resp.status} {body}",
                                fix="check the name, the credentials, and that the registry is running")

    def _check_realm(self, realm):
        """A token realm must be an https URL; plain http only when the registry itself is a plain-http
        loopback registry. Anything else (``file://``, ``ftp://``, http from an https registry) is refused."""
        try:
            p = urllib.parse.urlsplit(realm)
            p.port
        except ValueError:
            p = None
        if p is None or not p.hostname or p.username is not None or \
                not (p.scheme == "https" or (p.scheme == "http" and self.plain)):
            raise RegistryError(f"{self.host} names the token service (realm) {realm[:200]!r}: labkit asks only "
                                f"https token services (plain http only for a plain-http registry on this machine)",
                                fix="do not use this registry; a real one names an https:// realm")

    def _authenticate(self, challenge, scope):
        """Answer a ``Bearer realm=...`` challenge: ask the realm for a token (with the Basic credentials, if
        any, sent to the realm alone); True when one was given."""
        if not challenge.lower().startswith("bearer"):
            return False  # Basic: the credentials (if any) were sent already, a second try would be the same
        m = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if "realm" not in m:
            return False
        realm = m["realm"]
        self._check_realm(realm)
        params = {"service": m.get("service", ""), "scope": f"repository:{self.repo}:{scope}"}
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(params)
        resp = self._send("GET", url, cred=self.basic, cred_origin=_origin(realm), what="the token service")
        if resp.status != 200:
            resp.close()
            raise RegistryError(f"the token service {realm} answered {resp.status}",
                                fix="check the credentials for this registry")
        body = _json(_read_bounded(resp, MAX_MANIFEST_BYTES, f"the answer of the token service {realm}"),
                     f"the answer of the token service {realm}")
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
            raise RegistryError(f"the token service {realm} gave no usable token",
                                fix="check the credentials for this registry")
        self.token = token
        return True


# --- bounded reads and checks --------------------------------------------------------------------

def _content_length(resp):
    try:
        n = int(resp.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return n if n >= 0 else None


_clock = threading.local()


@contextlib.contextmanager
def _deadline(seconds=None):
    """The time one pull, push or search may take as a whole (MAX_TRANSFER_SECONDS), checked between reads."""
    _clock.end = time.monotonic() + (MAX_TRANSFER_SECONDS if seconds is None else seconds)
    try:
        yield
    finally:
        _clock.end = None


def _check_deadline(what):
    end = getattr(_clock, "end", None)
    if end is not None and time.monotonic() > end:
        raise RegistryError(f"the registry took longer than {MAX_TRANSFER_SECONDS} s in all (while reading {what})",
                            fix="try again later; a registry that sends this slowly is broken or hostile")


def _read(resp, n, what):
    """Up to ``n`` bytes of the body; a broken connection, or the transfer's time running out, is a
    RegistryError."""
    _check_deadline(what)
    try:
        return resp.read(n)
    except (OSError, http.client.HTTPException) as exc:
        raise RegistryError(f"the connection broke while reading {what}: {exc!r}",
                            fix="try again; if it keeps failing, the registry is broken") from None


def _read_bounded(resp, limit, what):
    """The whole body, refused (RegistryError) when longer than ``limit``; the response is closed."""
    try:
        n = _content_length(resp)
        if n is not None and n > limit:
            raise RegistryError(f"{what} is {n} bytes, more than the {limit} labkit accepts",
                                fix="do not use this registry or image (labkit bounds what a registry may send)")
        buf = bytearray()
        while len(buf) <= limit:
            chunk = _read(resp, min(CHUNK, limit + 1 - len(buf)), what)
            if not chunk:
                break
            buf += chunk
        if len(buf) > limit:
            raise RegistryError(f"{what} is more than the {limit} bytes labkit accepts",
                                fix="do not use this registry or image (labkit bounds what a registry may send)")
        return bytes(buf)
    finally:
        resp.close()


def _sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _verify(digest, got, what):
    if got != digest:
        raise UnsafeLayer(f"the registry sent {what} whose sha256 is {got}, not the {digest} it promised",
                          fix="the registry (or something between) altered the content: nothing of it was kept")


def _json(body, what):
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise RegistryError(f"{what} is not a JSON object", fix="the registry is broken: do not use it")
    return value


def _descriptor(desc, what, limit):
    """(digest, size, mediaType) of an OCI descriptor, checked: a sha256 digest, an integer size up to ``limit``."""
    if not isinstance(desc, dict):
        raise RegistryError(f"the manifest has no descriptor for {what}", fix="the image is malformed: do not use it")
    digest, size, mt = desc.get("digest"), desc.get("size"), desc.get("mediaType", "")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise RegistryError(f"the manifest gives {what} the digest {str(digest)[:100]!r}, not sha256:<64 hex digits>",
                            fix="the image is malformed: do not use it")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"the manifest gives {what} the size {str(size)[:40]!r}, not a byte count",
                            fix="the image is malformed: do not use it")
    if size > limit:
        raise UnsafeLayer(f"{what} ({digest}) declares {size} bytes, more than the {limit} labkit accepts",
                          fix="do not use this image (labkit bounds what a registry may send)")
    return digest, size, mt if isinstance(mt, str) else ""


def _get_manifest(s, repo, reference, what, want=None, size=None):
    """GET a manifest (bounded) by tag or digest; returns (sha256 of the body, the parsed body). Refused when the
    body is not ``want`` (the digest asked for), not the ``Docker-Content-Digest`` the registry gave with it,
    or not ``size`` bytes long (when an index declared it)."""
    resp = s.request("GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT})
    given = (resp.headers.get("Docker-Content-Digest") or "").strip()
    body = _read_bounded(resp, MAX_MANIFEST_BYTES, what)
    got = _sha256(body)
    if want is not None:
        _verify(want, got, what)
    if given.startswith("sha256:") and given != got:
        raise UnsafeLayer(f"the registry said {what} is {given}, but sent one whose sha256 is {got}",
                          fix="the registry (or something between) altered the content: nothing of it was kept")
    if size is not None and len(body) != size:
        raise UnsafeLayer(f"{what} is {len(body)} bytes, not the {size} its index declares",
                          fix="the registry (or something between) altered the content: nothing of it was kept")
    return got, _json(body, what)


def _resolve(s, repo, tag):
    """The tag's manifest, pinned: its digest (from HEAD's Docker-Content-Digest, then fetched by that digest
    and verified; or, with no such header, the sha256 of what the tag's GET returned) and its parsed body."""
    what = f"the manifest of {repo}:{tag}"
    head = s.request("HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}, ok=(200, 405))
    given = (head.headers.get("Docker-Content-Digest") or "").strip() if head.status == 200 else ""
    head.close()
    if given:
        if not DIGEST_RE.fullmatch(given):
            raise RegistryError(f"{s.host} gives {repo}:{tag} the digest {given[:100]!r}, not sha256:<64 hex digits>",
                                fix="labkit verifies sha256 digests only: do not use this registry")
        return _get_manifest(s, repo, given, what, want=given)
    return _get_manifest(s, repo, tag, what)


def _pick_platform(index):
    """The descriptor of this machine's CPU in an image index (Docker: manifest list)."""
    arch, variant = ARCH.get(platform.machine(), (platform.machine(), None))
    entries = index.get("manifests")
    entries = [m for m in entries if isinstance(m, dict)] if isinstance(entries, list) else []

    def plat(m):
        return m.get("platform") if isinstance(m.get("platform"), dict) else {}
    for m in entries:
        p = plat(m)
        if p.get("os") == "linux" and p.get("architecture") == arch and \
                (variant is None or p.get("variant") in (None, variant)):
            return m
    offered = ", ".join(f"{plat(m).get('os')}/{plat(m).get('architecture')}" for m in entries)
    raise NotFound(f"the image has no build for linux/{arch} (it offers {offered[:300]})",
                   fix="use an image built for this CPU, or build one with `labkit build`")


def _is_index(manifest):
    return manifest.get("mediaType") in (MT_OCI_INDEX, MT_DOCKER_LIST) or "manifests" in manifest


def _fetch_blob(s, repo, digest, size, path, what):
    """Stream blob ``digest`` to a new file ``path``: exactly ``size`` bytes (one more is refused, so an
    endless answer stops there), then its sha256 checked."""
    resp = s.request("GET", f"/v2/{repo}/blobs/{digest}")
    h, got = hashlib.sha256(), 0
    try:
        n = _content_length(resp)
        if n is not None and n != size:
            raise UnsafeLayer(f"the registry announces {what} ({digest}) as {n} bytes, not the {size} its "
                              f"descriptor declares", fix="the registry lies about the content: do not use it")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            while True:
                chunk = _read(resp, min(CHUNK, size + 1 - got), what)
                if not chunk:
                    break
                got += len(chunk)
                if got > size:
                    raise UnsafeLayer(f"the registry sent more of {what} ({digest}) than the {size} bytes its "
                                      f"descriptor declares", fix="the registry lies about the content: do not use it")
                h.update(chunk)
                f.write(chunk)
    finally:
        resp.close()
    if got != size:
        raise UnsafeLayer(f"{what} ({digest}) ended after {got} of the {size} bytes its descriptor declares",
                          fix="the transfer was cut short or the registry lies: try again, or do not use it")
    _verify(digest, "sha256:" + h.hexdigest(), what)


def _gunzip(blob, size, out, what):
    """Decompress a gzip layer to ``out``, bounded: at most max(GZIP_FREE_BYTES, GZIP_MAX_RATIO x its
    compressed size) and never above MAX_LAYER_BYTES. Returns the sha256 of the tar."""
    limit = min(MAX_LAYER_BYTES, max(GZIP_FREE_BYTES, GZIP_MAX_RATIO * size))
    return tarsafe.gunzip_bounded(blob, out, limit, what, how=f"labkit allows {GZIP_MAX_RATIO}x its size beyond "
                                  f"{GZIP_FREE_BYTES} bytes, and at most {MAX_LAYER_BYTES}")


def _store(tars, rec=None):
    """Add the checked layer tars [(path, diff_id)] to the store (path None: a layer the store holds already); if one is refused, whatever this call made
    for the earlier ones is removed again. Returns the diff_ids and the paths this call made (layers that
    were in the store already are left alone, whatever happens)."""
    made = []
    try:
        for tar, diff_id in tars:
            if tar is None:  # present when the pull began: still there now?
                if not _have_layer(diff_id):
                    raise RegistryError(f"layer {diff_id} left the store during the pull (pruned meanwhile)",
                                        fix="pull again")
                continue
            d = store.layer_dir(diff_id)
            made += [p for p in (d, d + ".json", store.blob_path(diff_id)) if not os.path.lexists(p)]
            store.add_layer_tar(tar, diff_id, rec=rec)
    except BaseException:
        _remove(made)
        raise
    return [d for _, d in tars], made


def _have_layer(diff_id):
    """The store holds this layer, unpacked and as its tar (a layer is only ever stored whole, once checked)."""
    return os.path.isdir(store.layer_dir(diff_id)) and os.path.isfile(store.blob_path(diff_id))


def _remove(paths):
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.unlink(p)


# --- pull, push, search --------------------------------------------------------------------------

def pull(ref, username=None, password=None):
    """:func:`_pull` within MAX_TRANSFER_SECONDS."""
    with _deadline():
        return _pull(ref, username, password)


def _up_to_date(ref, host, repo, digest):
    """The local image of ``ref`` when it was pulled from this registry's repository by the manifest digest the
    registry names now and every one of its layers is still in the store; otherwise None."""
    image = store.read_image(ref)  # (the record alone: never the built-in busybox made on the way)
    if image is None:
        return None
    src = image.get("source")
    if not (isinstance(src, dict) and src.get("registry") == host and src.get("repository") == repo
            and src.get("tag") == ref.tag and src.get("digest") == digest):
        return None
    return image if all(_have_layer(d) for d in image["layers"]) else None


def _pull(ref, username=None, password=None):
    """Pull ``ref`` ([host/]name[:tag]) into the local store; returns the image and the HTTP record.

    Everything is fetched and checked (digests, sizes, decompressed sizes, tar format) in a private work
    directory first; only then do the layers go into the store, and the image entry is written last."""
    ref = ImageRef.parse(ref)
    host, repo = ref.registry
    rec = Recorder(f"pull {ref}")
    s = Session(host, repo, username, password, rec)
    digest, manifest = _resolve(s, repo, ref.tag)
    rec.fact("digest", digest)
    held = _up_to_date(ref, host, repo, digest)
    if held is not None:  # docker pull's "Image is up to date": this tag already names that manifest, whole
        rec.fact("up_to_date", True)
        rec.fact("layers_present", list(held["layers"]))
        rec.fact("layers_fetched", [])
        return rec.to_dict(image=held)
    rec.fact("up_to_date", False)
    if _is_index(manifest):
        want, size, _ = _descriptor(_pick_platform(manifest), "this CPU's manifest", MAX_MANIFEST_BYTES)
        _, manifest = _get_manifest(s, repo, want, f"the manifest {want}", want=want, size=size)
        if _is_index(manifest):
            raise RegistryError(f"{repo}:{ref.tag}: the index points to another index",
                                fix="labkit resolves one level of index: do not use this image")
        rec.fact("manifest", want)
    cdigest, csize, _ = _descriptor(manifest.get("config"), "the image config", MAX_MANIFEST_BYTES)
    descs = manifest.get("layers")
    if not isinstance(descs, list):
        raise RegistryError(f"the manifest of {repo}:{ref.tag} lists no layers",
                            fix="the image is malformed: do not use it")
    if len(descs) > MAX_LAYERS:
        raise RegistryError(f"the manifest of {repo}:{ref.tag} lists {len(descs)} layers, more than {MAX_LAYERS}",
                            fix="do not use this image (labkit bounds what a registry may send)")
    descs = [_descriptor(d, f"layer {i + 1}", MAX_BLOB_BYTES) for i, d in enumerate(descs)]
    for i, (_, _, mt) in enumerate(descs):
        if "zstd" in mt:
            raise RegistryError(f"layer {i + 1} is zstd-compressed ({mt})",
                                fix="labkit unpacks tar and tar+gzip layers only: pull a gzip build of the image")
    os.makedirs(STATE_DIR, exist_ok=True)
    work = tempfile.mkdtemp(prefix="pull-", dir=STATE_DIR)
    try:
        cpath = os.path.join(work, "config")
        _fetch_blob(s, repo, cdigest, csize, cpath, "the image config")
        with open(cpath, "rb") as f:
            config = _json(f.read(), "the image config")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(descs) or \
                not all(isinstance(d, str) and DIGEST_RE.fullmatch(d) for d in diff_ids):
            raise UnsafeLayer(f"the image config's rootfs.diff_ids do not list one sha256 digest for each of the "
                              f"{len(descs)} layers", fix="the image is malformed: do not use it")
        tars, present = [], []
        for i, ((ldigest, lsize, mt), diff_id) in enumerate(zip(descs, diff_ids)):
            what = f"layer {i + 1}"
            if _have_layer(diff_id):  # docker pull's "Already exists": the store checked this layer when it came
                present.append(ldigest)
                tars.append((None, diff_id))
                continue
            blob = os.path.join(work, f"layer{i}")
            _fetch_blob(s, repo, ldigest, lsize, blob, what)
            with open(blob, "rb") as f:
                gz = f.read(2) == b"\x1f\x8b"
            if "gzip" in mt or gz:
                tar = blob + ".tar"
                got = _gunzip(blob, lsize, tar, what)
                os.unlink(blob)
            else:
                tar, got = blob, ldigest
            tarsafe.check_plain_tar(tar, what)
            if got != diff_id:
                raise UnsafeLayer(f"{what} unpacks to a tar whose sha256 is {got}, not the {diff_id} the image "
                                  f"config names", fix="the image is malformed or altered: do not use it")
            tars.append((tar, diff_id))
        rec.fact("layers_present", present)
        rec.fact("layers_fetched", [d for d, _, _ in descs if d not in present])
        cfg = store.image_config(config.get("config"), f"{ref}")  # types checked, WorkingDir absolute
        history = config.get("history") if isinstance(config.get("history"), list) else []
        with store.locked():  # no prune, and no other pull storing, between the layers and the record naming them
            layers, made = _store(tars, rec)
            try:
                image = {"layers": layers, "config": cfg,
                         "history": history, "created": time.time(),
                         "source": {"registry": host, "repository": repo, "tag": ref.tag, "digest": digest}}
                saved = store.save_image(ref, image)
            except BaseException:
                _remove(made)
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rec.to_dict(image=saved)


def push(ref, username=None, password=None):
    """:func:`_push` within MAX_TRANSFER_SECONDS."""
    with _deadline():
        return _push(ref, username, password)


def _push(ref, username=None, password=None):
    """Push local image ``ref`` (its name says where: host/repo:tag) to its registry, holding the store's lock
    shared (as a build does): no prune removes a layer while it is read."""
    with store.locked(shared=True):
        return _push_locked(ref, username, password)


def _push_locked(ref, username, password):
    ref = ImageRef.parse(ref)
    host, repo = ref.registry
    if host == "registry-1.docker.io" and username is None:
        raise InvalidSpec(f"pushing {ref} would go to Docker Hub", fix="tag it for your registry first, e.g. "
                          f"labkit tag {ref} 127.0.0.1:5000/{ref.name}:{ref.tag}")
    image = store.load_image(ref)
    rec = Recorder(f"push {ref}")
    s = Session(host, repo, username, password, rec)
    config = json.dumps(oci.oci_config(image), sort_keys=True).encode()
    cdigest = _sha256(config)
    blobs = [(d, store.blob_path(d)) for d in image["layers"]]
    pushed = []
    for digest, path in blobs + [(cdigest, None)]:
        head = s.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope="pull,push", ok=(200, 404))
        head.close()
        if head.status == 200:
            continue
        start = s.request("POST", f"/v2/{repo}/blobs/uploads/", data=b"", scope="pull,push")
        loc = start.headers.get("Location")
        start.close()
        if not loc:
            raise RegistryError(f"{host} started an upload without saying where to send it (no Location)",
                                fix="the registry is broken: do not use it")
        loc = urllib.parse.urljoin(start.url, loc)
        loc += ("&" if "?" in loc else "?") + urllib.parse.urlencode({"digest": digest})
        if path is None:
            data = config
        else:
            with open(path, "rb") as f:
                data = f.read()
        s.request("PUT", loc, data=data, headers={"Content-Type": "application/octet-stream"},
                  scope="pull,push").close()
        pushed.append(digest)
    manifest = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": len(config)},
                "layers": [{"mediaType": MT_OCI_LAYER, "digest": d, "size": os.path.getsize(p)} for d, p in blobs]}
    body = json.dumps(manifest, sort_keys=True).encode()
    resp = s.request("PUT", f"/v2/{repo}/manifests/{ref.tag}", data=body,
                     headers={"Content-Type": MT_OCI_MANIFEST}, scope="pull,push")
    resp.close()
    rec.fact("pushed_blobs", pushed)
    rec.fact("manifest", _sha256(body))
    return rec.to_dict(ref=str(ref))


def search(term, host="127.0.0.1:5000"):
    """:func:`_search` within MAX_TRANSFER_SECONDS."""
    with _deadline():
        return _search(term, host)


HUB_NAMES = ("docker.io", "index.docker.io", "hub.docker.com")
MAX_SEARCH_RESULTS = 100


def _search(term, host="127.0.0.1:5000"):
    """``docker search``: repositories whose name contains ``term``, as rows {name, description, stars,
    official}. A registry's catalog (the v2 API has no search: the names are filtered here), or Docker Hub's
    own search when ``host`` is docker.io (online only)."""
    if not isinstance(term, str) or not term or len(term) > 256:
        raise InvalidSpec(f"{term!r} is not a search term", fix="e.g. labkit search nginx")
    if host in HUB_NAMES:
        s = Session("index.docker.io", "", rec=Recorder(f"search {term} on Docker Hub"))
        found = _json(_read_bounded(s.request("GET", "/v1/search?" + urllib.parse.urlencode(
            {"q": term, "n": 25})), MAX_MANIFEST_BYTES, "Docker Hub's search"), "Docker Hub's search")
        rows = found.get("results") if isinstance(found, dict) else None
        return [{"name": str(r.get("name", "")), "description": str(r.get("description") or ""),
                 "stars": r.get("star_count") if isinstance(r.get("star_count"), int) else 0,
                 "official": r.get("is_official") is True} for r in (rows or [])[:MAX_SEARCH_RESULTS]
                if isinstance(r, dict)]
    s = Session(host, "", rec=Recorder(f"search {term}"))
    catalog = _json(_read_bounded(s.request("GET", "/v2/_catalog?n=1000"), MAX_MANIFEST_BYTES, "the catalog"),
                    "the catalog")
    repos = catalog.get("repositories") if isinstance(catalog, dict) else None
    names = [r for r in repos if isinstance(r, str) and term in r] if isinstance(repos, list) else []
    return [{"name": f"{host}/{r}", "description": "", "stars": 0, "official": False}
            for r in names[:MAX_SEARCH_RESULTS]]


__all__ = ["pull", "push", "search", "is_loopback", "RegistryError", "LabkitError"]
