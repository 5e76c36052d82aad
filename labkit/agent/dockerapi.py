"""Docker's Engine API in front of labkit's engine: what lets the real docker CLI and SDK drive it.

The daemon (:mod:`labkit.agent.daemon`) hands each connection of ``/run/labkit/docker.sock`` to
:meth:`EngineAPI.serve_connection`: HTTP/1.1 requests (keep-alive; bodies by Content-Length or chunked,
both bounded), answered from the same engine functions every other labkit client reaches
(:mod:`labkit.agent.engine`, :mod:`labkit.agent.store`, :mod:`labkit.agent.registry`). The API version is
Docker's 1.41 (what Debian 12's docker 20.10 speaks); paths come with or without their ``/v1.NN`` prefix,
and ``/_ping`` carries the ``API-Version`` header the client negotiates from.

What it serves: ping, version, info; containers (list, create with ports, env, limits, capabilities,
binds, auto-remove; start, stop, kill, wait with its conditions, remove, inspect, top, logs, attach for
output); images (list, inspect, pull with progress lines, tag, remove with Docker's conflict); networks
(list, filtered by name). A request for what labkit does not do yet (a terminal: ``-t``; stdin: ``-i``; a
create field outside :attr:`EngineAPI.CREATE_FIELDS` that is not left at its default; a filter it does not
apply; an API version above 1.41) is refused with a message that says so, never accepted and ignored. labkit keeps one log per container for stdout and
stderr together: its log and attach streams send it all as stdout. Standard library only.
"""
import json
import os
import re
import socket
import threading
import time
import urllib.parse

from ..wire.errors import Conflict, InvalidSpec, LabkitError, NotFound
from ..wire.specs import RUN_DIR, ContainerSpec, ImageRef, NetworkSpec
from ..wire.words import Detach, container_status, detach_keys, pull_status, signal_number
from . import engine, enter, kernel, network, registry, store
from .oci import OCI_ARCH
from .state import private_dir, read_json, write_json

API_VERSION = "1.41"
MIN_API_VERSION = "1.12"
MAX_HEADER = 64 << 10
MAX_BODY = 16 << 20
EXTRA = f"{RUN_DIR}/dockerapi"  # what Docker's API knows of a container and labkit's engine does not (AutoRemove)
ACCESS_LOG = f"{RUN_DIR}/dockerapi.log"  # one line per request, as a client sent it (lab 06 reads it)
MAX_ACCESS_LOG = 1 << 20

_STATUS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           503: "Service Unavailable"}


class HTTPError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _error_status(exc):
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, InvalidSpec):
        return 400
    return 500


MAX_CONTEXT_BYTES = 64 << 20  # a build context, unpacked
MAX_CONTEXT_FILE = 8 << 20


MAX_CONTEXT_MEMBERS = 10000


def _unpacked(body):
    """The build context's tar, decompressed here (gzip, bzip2, xz or none) to at most MAX_CONTEXT_BYTES: a
    small body that unpacks to gigabytes is refused before it is, not after."""
    import bz2
    import lzma
    import zlib
    if body[:2] == b"\x1f\x8b":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif body[:3] == b"BZh":
        d = bz2.BZ2Decompressor()
    elif body[:6] == b"\xfd7zXZ\x00":
        d = lzma.LZMADecompressor()
    else:
        return body
    try:
        if isinstance(d, type(zlib.decompressobj())):
            out = d.decompress(body, MAX_CONTEXT_BYTES + 1)
        else:
            out = d.decompress(body, max_length=MAX_CONTEXT_BYTES + 1)
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
        raise HTTPError(400, f"the build context does not decompress: {exc}") from None
    if len(out) > MAX_CONTEXT_BYTES:
        raise HTTPError(413, f"build context over {MAX_CONTEXT_BYTES >> 20} MiB unpacked")
    return out


def _context_files(body):
    """A build context tar (plain or compressed) as {relative path: text}, as `labkit build` sends it: regular
    files only, no path leaving the context, each under 8 MiB, all under 64 MiB unpacked and 10000 members;
    binary files are left out (labkit's COPY takes text)."""
    import io
    import posixpath
    import tarfile
    out, count = {}, 0
    try:
        with tarfile.open(fileobj=io.BytesIO(_unpacked(body)), mode="r:") as tar:
            for m in tar:
                count += 1
                if count > MAX_CONTEXT_MEMBERS:
                    raise HTTPError(413, f"build context over {MAX_CONTEXT_MEMBERS} files")
                if not m.isreg():
                    continue
                name = posixpath.normpath(m.name.lstrip("/"))
                if name == ".." or name.startswith("../") or name in (".", "") or "\0" in name:
                    raise HTTPError(400, f"build context: {m.name!r} leaves the context")
                if m.size > MAX_CONTEXT_FILE:
                    continue
                data = tar.extractfile(m).read(MAX_CONTEXT_FILE + 1)
                try:
                    out[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    continue
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise HTTPError(400, f"the build context is not a tar archive: {exc}") from None
    return out


def _registry_auth(header):
    """(username, password) from Docker's X-Registry-Auth header (base64url JSON), or (None, None)."""
    import base64
    if not header:
        return None, None
    try:
        data = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, TypeError):
        raise HTTPError(400, "X-Registry-Auth is not base64url JSON") from None
    if not isinstance(data, dict) or not data.get("username"):
        return None, None
    return str(data["username"]), str(data.get("password") or "")


def _free_subnet(taken):
    import ipaddress
    used = [ipaddress.ip_network(t) for t in taken]
    for i in range(256):
        net = ipaddress.ip_network(f"10.215.{i}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise HTTPError(409, "no free 10.215.x.0/24 subnet left: remove a network, or give --subnet")


def _progress(w, obj):
    """One line of Docker's JSON progress stream (pull, push, build)."""
    w.write(json.dumps(obj).encode() + b"\r\n")


def _stream_error(w, exc):
    """An error after a progress stream's head: it can only go in the stream, as Docker's errorDetail line."""
    msg = exc.message if isinstance(exc, LabkitError) else f"{type(exc).__name__}: {exc}"
    _progress(w, {"errorDetail": {"message": msg}, "error": msg})


def _winsize(fd, h, w):
    if not (0 < h < 10000 and 0 < w < 10000):
        raise HTTPError(400, "h and w: the terminal's rows and columns")
    kernel.set_winsize(fd, h, w)


def _relay_frames(proc, w, stdout, stderr):
    """A program's stdout and stderr as Docker's multiplexed stream (stream 1 and 2), until both have ended."""
    import selectors
    sel = selectors.DefaultSelector()
    for f, stream, wanted in ((proc.stdout, 1, stdout), (proc.stderr, 2, stderr)):
        if f is not None:
            sel.register(f, selectors.EVENT_READ, (stream, wanted))
    try:
        while sel.get_map():
            for key, _ in sel.select():
                data = os.read(key.fileobj.fileno(), 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                elif key.data[1]:
                    w.write(_frame(data, key.data[0]))
    finally:
        sel.close()


def _detach_keys(spec):
    """The detach keys a client asked for (``detachKeys``, exec's ``DetachKeys``), Docker's ctrl-p,ctrl-q when it
    asked for none; a 400 that says the format for keys that are not."""
    if spec in (None, ""):
        return detach_keys()
    try:
        return detach_keys(spec)
    except ValueError as exc:
        raise HTTPError(400, f"Invalid detach keys ({spec}) provided: {exc}") from None


def _frame(data, stream=1):
    """Docker's multiplexed stream: a header (stream, 0, 0, 0, big-endian length) before each piece."""
    return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data


class _Request:
    def __init__(self, method, path, query, headers, body, raw_path=None):
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body
        self.raw_path = raw_path or path
        self.version = "HTTP/1.1"

    def arg(self, name, default=None):
        return self.query.get(name, [default])[-1]

    def flag(self, name):
        return str(self.arg(name, "")).lower() in ("1", "true", "yes")

    def json(self):
        if not self.body:
            return {}
        try:
            obj = json.loads(self.body)
        except ValueError:
            raise HTTPError(400, "the request body is not JSON") from None
        if not isinstance(obj, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return obj


class EngineAPI:
    """The routes; ``daemon`` gives the lock that takes changes one at a time."""

    def __init__(self, daemon=None):
        self.daemon = daemon
        self.lock = daemon.lock if daemon is not None else threading.Lock()
        self.attached, self.lock_attached = {}, threading.Lock()  # container id: streams following its log
        self.pending = {}  # container id: [(connection fd, stdin, stdout)] attached before the start
        self.execs, self.lock_execs = {}, threading.Lock()  # exec id: what docker exec asked, and how it went
        self._watch_auto_remove()

    # -- the connection -------------------------------------------------------------------------------------
    def serve_connection(self, conn):
        with conn:
            rfile, wfile = conn.makefile("rb"), conn.makefile("wb", buffering=0)
            with rfile, wfile:  # (closed before the socket: a file made from it would keep it open)
                self._serve(conn, rfile, wfile)

    def _serve(self, conn, rfile, wfile):
        try:
            while True:
                req = self._read_request(rfile)
                if req is None:
                    return
                if not self._answer(req, wfile, conn):
                    return
                if req.headers.get("connection", "").lower() == "close" or req.version == "HTTP/1.0":
                    return  # the client asked to close after this answer
        except (OSError, ConnectionError):
            return
        except HTTPError as exc:  # the request itself was unreadable: answer, then hang up
            try:
                self._send(wfile, exc.status, {"message": str(exc)}, close=True)
            except OSError:
                pass

    def _read_request(self, rfile):
        line = rfile.readline(MAX_HEADER)
        while line in (b"\r\n", b"\n"):
            line = rfile.readline(MAX_HEADER)
        if not line:
            return None
        try:
            method, target, version = line.decode("latin-1").split(" ", 2)
        except ValueError:
            raise HTTPError(400, "malformed request line") from None
        headers, size = {}, len(line)
        while True:
            h = rfile.readline(MAX_HEADER)
            size += len(h)
            if size > MAX_HEADER:
                raise HTTPError(400, "request headers too long")
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        try:
            body = self._read_body(rfile, headers)
        except ValueError:
            raise HTTPError(400, "malformed Content-Length or chunk size") from None
        url = urllib.parse.urlsplit(target)
        m = re.match(r"^/v([0-9]+)\.([0-9]+)(?=/)", url.path)
        if m:
            asked = (int(m.group(1)), int(m.group(2)))
            if asked > _version(API_VERSION):
                raise HTTPError(400, f"client version {m.group(1)}.{m.group(2)} is too new. Maximum supported API "
                                     f"version is {API_VERSION}")
            if asked < _version(MIN_API_VERSION):
                raise HTTPError(400, f"client version {m.group(1)}.{m.group(2)} is too old. Minimum supported API "
                                     f"version is {MIN_API_VERSION}, please upgrade your client to a newer version")
        path = urllib.parse.unquote(url.path[m.end():] if m else url.path)
        req = _Request(method.upper(), path, urllib.parse.parse_qs(url.query), headers, body, url.path)
        req.version = version.strip()
        return req

    @staticmethod
    def _read_body(rfile, headers):
        def size(text, base):
            text = text.strip()
            if not text or not re.fullmatch(rb"[0-9a-fA-F]+" if base == 16 else rb"[0-9]+", text):
                raise ValueError(text)
            return int(text, base)

        def exactly(n):
            data = rfile.read(n)
            if len(data) != n:
                raise HTTPError(400, "the request body ended early")
            return data
        body = bytearray()
        te = headers.get("transfer-encoding", "").lower()
        if te and te != "chunked":
            raise HTTPError(501, f"Transfer-Encoding {te!r}: only chunked is understood")
        if te == "chunked":
            while True:
                n = size(rfile.readline(100).split(b";")[0], 16)
                if n == 0:
                    while rfile.readline(MAX_HEADER) not in (b"\r\n", b"\n", b""):
                        pass  # trailers: read, not kept
                    break
                if len(body) + n > MAX_BODY:
                    raise HTTPError(413, f"request body over {MAX_BODY >> 20} MiB")
                body += exactly(n)
                rfile.readline(100)
        elif headers.get("content-length"):
            n = size(headers["content-length"].encode(), 10)
            if n > MAX_BODY:
                raise HTTPError(413, f"request body over {MAX_BODY >> 20} MiB")
            body += exactly(n)
        return bytes(body)

    def _send(self, wfile, status, obj=None, ctype="application/json", close=False, extra=None):
        body = b"" if obj is None else (obj if isinstance(obj, bytes) else json.dumps(obj).encode())
        head = [f"HTTP/1.1 {status} {_STATUS.get(status, 'OK')}", f"Api-Version: {API_VERSION}",
                "Docker-Experimental: false", "Ostype: linux", "Server: labkit", f"Content-Length: {len(body)}"]
        if obj is not None:
            head.append(f"Content-Type: {ctype}")
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        if close:
            head.append("Connection: close")
        wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    def _answer(self, req, wfile, conn):
        """Answer one request; False when the connection is done (hijacked, or to be closed)."""
        _access(req, "->")
        try:
            route = self._route(req)
            result = route(req, wfile, conn)
        except HTTPError as exc:
            self._send(wfile, exc.status, {"message": str(exc)})
            return True
        except LabkitError as exc:
            msg = exc.message + (f" (fix: {exc.fix})" if exc.fix else "")
            self._send(wfile, _error_status(exc), {"message": msg})
            return True
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
            # a field of the wrong kind: the client's to mend
            self._send(wfile, 400, {"message": f"bad request: {type(exc).__name__}: {exc}"})
            return True
        except ConnectionError:
            raise  # the client went away: the connection ends
        except Exception as exc:  # noqa: BLE001 - a bug here (an OSError too) must not cost the client its answer
            self._send(wfile, 500, {"message": f"labkit's Engine API failed: {type(exc).__name__}: {exc}"})
            return True
        if result is _HIJACKED:
            return False
        if result is _ANSWERED:
            return True
        status, obj = result if isinstance(result, tuple) else (200, result)
        if req.method == "HEAD":
            self._send(wfile, status, None, extra={"Content-Type": "text/plain; charset=utf-8"})
        elif isinstance(obj, str):
            self._send(wfile, status, obj.encode(), ctype="text/plain; charset=utf-8")
        else:
            self._send(wfile, status, obj)
        return True

    ROUTES = [
        ("GET|HEAD", r"/_ping", "ping"), ("GET", r"/version", "version"), ("GET", r"/info", "info"),
        ("GET", r"/containers/json", "containers_list"), ("POST", r"/containers/create", "container_create"),
        ("GET", r"/containers/(?P<id>[^/]+)/json", "container_inspect"),
        ("POST", r"/containers/(?P<id>[^/]+)/start", "container_start"),
        ("POST", r"/containers/(?P<id>[^/]+)/stop", "container_stop"),
        ("POST", r"/containers/(?P<id>[^/]+)/kill", "container_kill"),
        ("POST", r"/containers/(?P<id>[^/]+)/wait", "container_wait"),
        ("GET", r"/containers/(?P<id>[^/]+)/logs", "container_logs"),
        ("GET", r"/containers/(?P<id>[^/]+)/top", "container_top"),
        ("POST", r"/containers/(?P<id>[^/]+)/attach", "container_attach"),
        ("POST", r"/containers/(?P<id>[^/]+)/resize", "container_resize"),
        ("POST", r"/containers/(?P<id>[^/]+)/exec", "exec_create"),
        ("POST", r"/exec/(?P<id>[0-9a-f]{64})/start", "exec_start"),
        ("POST", r"/exec/(?P<id>[0-9a-f]{64})/resize", "exec_resize"),
        ("GET", r"/exec/(?P<id>[0-9a-f]{64})/json", "exec_inspect"),
        ("DELETE", r"/containers/(?P<id>[^/]+)", "container_remove"),
        ("GET", r"/images/json", "images_list"), ("POST", r"/images/create", "image_pull"),
        ("GET", r"/images/search", "image_search"), ("POST", r"/build", "image_build"),
        ("POST", r"/images/(?P<name>.+)/push", "image_push"),
        ("GET", r"/images/(?P<name>.+)/json", "image_inspect"),
        ("POST", r"/images/(?P<name>.+)/tag", "image_tag"),
        ("DELETE", r"/images/(?P<name>.+)", "image_remove"),
        ("GET", r"/networks", "networks_list"), ("POST", r"/networks/create", "network_create"),
        ("GET", r"/networks/(?P<name>[^/]+)", "network_inspect"),
        ("DELETE", r"/networks/(?P<name>[^/]+)", "network_remove"),
    ]

    def _route(self, req):
        for methods, pattern, name in self.ROUTES:
            m = re.fullmatch(pattern, req.path)
            if m and req.method in methods.split("|"):
                fn = getattr(self, name)
                return lambda r, w, c: fn(r, w, c, **m.groupdict())
        raise HTTPError(404 if not any(re.fullmatch(p, req.path) for _, p, _ in self.ROUTES) else 400,
                        f"labkit's Engine API does not serve {req.method} {req.path}")

    # -- system ---------------------------------------------------------------------------------------------
    def ping(self, req, w, c):
        return "OK"

    def version(self, req, w, c):
        from ..wire.protocol import VERSION
        u = os.uname()
        return {"Platform": {"Name": "labkit"},
                "Components": [{"Name": "Engine", "Version": VERSION,
                                "Details": {"ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION,
                                            "Os": "linux", "Arch": _arch(), "KernelVersion": u.release}}],
                "Version": VERSION, "ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "GitCommit": "",
                "GoVersion": "", "Os": "linux", "Arch": _arch(), "KernelVersion": u.release, "BuildTime": ""}

    def info(self, req, w, c):
        rows = engine.ps(all=True)
        running = sum(1 for r in rows if r["running"])
        from . import cgroups
        u = os.uname()
        from ..wire.protocol import VERSION
        return {"ID": "labkit", "Name": u.nodename, "ServerVersion": VERSION,
                "Containers": len(rows), "ContainersRunning": running,
                "ContainersStopped": sum(1 for r in rows if r["state"] == "exited"),
                "ContainersPaused": 0, "Images": len(store.list_images()), "Driver": "overlay",
                "DockerRootDir": "/var/lib/labkit", "OperatingSystem": _os_name(), "OSType": "linux",
                "Architecture": u.machine, "KernelVersion": u.release, "NCPU": os.cpu_count(),
                "MemTotal": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                "CgroupVersion": "2" if cgroups.detect().get("mode") == "v2" else "1",
                "CgroupDriver": "cgroupfs", "LiveRestoreEnabled": True, "Runtimes": {"labkit": {"path": "labkit"}},
                "DefaultRuntime": "labkit", "SecurityOptions": [], "Warnings": []}

    # -- containers -----------------------------------------------------------------------------------------
    def containers_list(self, req, w, c):
        filters = _filters(req, ("name", "id", "status", "ancestor"))
        rows = engine.ps(all=req.flag("all") or bool(filters.get("status")) or bool(req.arg("limit")))
        if filters.get("name"):
            try:
                rows = [r for r in rows if any(re.search(p, r["name"]) for p in filters["name"])]
            except re.error as exc:
                raise HTTPError(400, f"name filter: {exc}") from None
        if filters.get("id"):
            rows = [r for r in rows if any(r["id"].startswith(p) for p in filters["id"])]
        if filters.get("status"):
            bad = set(filters["status"]) - {"created", "running", "exited", "paused", "restarting", "removing", "dead"}
            if bad:
                raise HTTPError(400, f"invalid filter 'status={sorted(bad)[0]}'")
            rows = [r for r in rows if r["state"] in filters["status"]]
        if filters.get("ancestor"):
            wanted = {str(ImageRef.parse(a)) for a in filters["ancestor"]}
            rows = [r for r in rows if r["image"] in wanted]
        limit = int(req.arg("limit") or 0)
        if limit > 0:
            rows = rows[:limit]
        out = []
        for r in rows:
            cfg = engine._config(r["id"])
            status = container_status(r)
            out.append({"Id": r["id"], "Names": ["/" + r["name"]], "Image": r["image"], "ImageID": cfg["image_id"],
                        "Command": r["command"], "Created": int(r["created"]), "State": r["state"],
                        "Status": status, "Labels": {}, "Mounts": [],
                        "Ports": [{"IP": p["host_ip"], "PrivatePort": p["container_port"],
                                   "PublicPort": p["host_port"], "Type": p["proto"]} for p in cfg["ports"]],
                        "HostConfig": {"NetworkMode": cfg["network"] or "none"},
                        "NetworkSettings": {"Networks": {cfg["network"]: {}} if cfg["network"] else {}}})
            if req.flag("size"):
                out[-1]["SizeRw"] = _du(cfg["upper"])
        return out

    #: what container create understands; any other field must hold its default (empty, zero, false), or the
    #: request is refused with its name: labkit never takes an option and does nothing with it
    CREATE_FIELDS = {"Image", "Cmd", "Entrypoint", "Env", "Hostname", "WorkingDir", "User", "Tty", "OpenStdin",
                     "AttachStdin", "AttachStdout", "AttachStderr", "StdinOnce", "ExposedPorts", "HostConfig",
                     "NetworkingConfig", "Domainname"}
    HOST_FIELDS = {"PortBindings", "Binds", "NetworkMode", "Memory", "NanoCpus", "PidsLimit", "CapAdd", "CapDrop",
                   "Privileged", "ReadonlyRootfs", "AutoRemove", "LogConfig", "RestartPolicy", "ConsoleSize", "ExtraHosts"}

    #: defaults the docker CLI sends that are not empty: -1 is "the kernel's default swappiness"
    HOST_DEFAULTS = {"MemorySwappiness": -1}

    def container_create(self, req, w, c):
        body = req.json()
        hc = body.get("HostConfig") or {}
        if not isinstance(hc, dict):
            raise HTTPError(400, "HostConfig must be an object")
        unsupported = [k for k, v in body.items() if k not in self.CREATE_FIELDS and not _empty(v)]
        unsupported += [f"HostConfig.{k}" for k, v in hc.items() if k not in self.HOST_FIELDS and not _empty(v)
                        and v != self.HOST_DEFAULTS.get(k, object())]
        log = hc.get("LogConfig") or {}
        if log.get("Type") not in (None, "", "local") or not _empty(log.get("Config")):
            unsupported.append("HostConfig.LogConfig (labkit keeps one log file per container)")
        if (hc.get("RestartPolicy") or {}).get("Name") not in (None, "", "no"):
            unsupported.append("HostConfig.RestartPolicy")
        if not _empty((body.get("NetworkingConfig") or {}).get("EndpointsConfig")):
            unsupported.append("NetworkingConfig (addresses and aliases)")
        if body.get("Domainname"):
            unsupported.append("Domainname")
        if unsupported:
            raise HTTPError(400, f"labkit's Engine API does not do {', '.join(sorted(unsupported))} (yet): leave "
                                 "them out, or see `labkit create --help` for what labkit's engine offers")
        if not isinstance(body.get("Image"), str) or not body["Image"]:
            raise HTTPError(400, "no image: the request must name one (Image)")
        argv = []
        for key in ("Entrypoint", "Cmd"):
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise HTTPError(400, f"{key} must be a list of strings, e.g. [\"echo\", \"hi\"]")
            argv += value
        ports = []
        for cport, binds in (hc.get("PortBindings") or {}).items():
            num, _, proto = cport.partition("/")
            for b in binds or [{}]:
                b = b or {}
                ip = b.get("HostIp") or ""
                host = b.get("HostPort") or str(_free_port(ip or "0.0.0.0", proto or "tcp"))  # Docker: any free one
                ports.append(f"{ip + ':' if ip else ''}{host}:{num}/{proto or 'tcp'}")
        binds = []
        for b in hc.get("Binds") or []:
            parts = b.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and set(parts[2].split(",")) - {"ro", "rw"}):
                raise HTTPError(400, f"bind {b!r}: labkit takes SRC:DST, SRC:DST:ro or SRC:DST:rw")
            binds.append((parts[0], parts[1], len(parts) == 3 and "ro" in parts[2].split(",")))
        mode = hc.get("NetworkMode") or "default"
        if mode in ("host", "container") or mode.startswith("container:"):
            raise HTTPError(400, f"network mode {mode!r}: labkit's containers have a network namespace of their own "
                                 "(a labkit network, the default one, or none)")
        net = None if mode == "none" else ("default" if mode in ("default", "bridge") else mode)
        if net not in (None, "default") and net not in [n["spec"]["name"] for n in network.list_networks()]:
            raise HTTPError(404, f"network {net} not found")
        env = []
        for e in body.get("Env") or []:
            k, sep, v = str(e).partition("=")
            if not sep:
                raise HTTPError(400, f"Env entry {e!r} has no '=': write NAME=VALUE")
            env.append((k, v))
        pids = hc.get("PidsLimit")
        try:
            spec = ContainerSpec(image=body["Image"], name=req.arg("name") or None, cmd=tuple(argv) or None,
                                 env=tuple(env), hostname=body.get("Hostname") or None, ports=tuple(ports),
                                 memory=hc.get("Memory") or None, nano_cpus=hc.get("NanoCpus") or None,
                                 pids_limit=pids if pids and pids > 0 else None, binds=tuple(binds),
                                 read_only=bool(hc.get("ReadonlyRootfs")), workdir=body.get("WorkingDir") or None,
                                 user=body.get("User") or None, network=net,
                                 cap_add=tuple(hc.get("CapAdd") or ()), cap_drop=tuple(hc.get("CapDrop") or ()),
                                 privileged=bool(hc.get("Privileged")), tty=bool(body.get("Tty")),
                                 open_stdin=bool(body.get("OpenStdin")), stdin_once=bool(body.get("StdinOnce")),
                                 extra_hosts=tuple(hc.get("ExtraHosts") or ()))
        except LabkitError as exc:
            raise HTTPError(400, exc.message + (f" (fix: {exc.fix})" if exc.fix else "")) from None
        with self.lock:
            try:
                store.load_image(spec.image)
            except NotFound:
                raise HTTPError(404, f"No such image: {spec.image}") from None
            res = engine.create(spec)
        if hc.get("AutoRemove"):
            private_dir(EXTRA)
            write_json(f"{EXTRA}/{res['id']}.json", {"auto_remove": True})
        return 201, {"Id": res["id"], "Warnings": []}

    def container_inspect(self, req, w, c, id):
        out = engine.inspect(id)
        out["HostConfig"]["AutoRemove"] = bool(read_json(f"{EXTRA}/{out['Id']}.json", default={}) or {})
        out["HostConfig"]["LogConfig"] = {"Type": "local", "Config": {}}  # one file per container
        out["Created"] = _rfc3339(out["Created"])
        for k in ("StartedAt", "FinishedAt"):
            out["State"][k] = _rfc3339(out["State"].get(k))
        out["State"]["ExitCode"] = out["State"].get("ExitCode") or 0
        out["State"].update(Paused=False, Restarting=False, OOMKilled=False, Dead=False, Error="")
        return out

    def container_start(self, req, w, c, id):
        with self.lock:
            cid = engine._resolve(id)
            if engine._state(cid)[2]:
                return 304, None
            with self.lock_attached:
                attach = self.pending.pop(cid, [])
            try:
                engine.start_attached(cid, attach)
            except LabkitError as exc:
                code = exc.details.get("exit_code")
                if code in (126, 127):  # the docker CLI tells these apart by Docker's own words
                    what = "executable file not found in $PATH" if code == 127 else "permission denied"
                    raise HTTPError(400, f"failed to create task for container: exec: {what}: "
                                         f"{exc.message}") from None
                raise
            finally:
                for a in attach:  # the supervisor has its own copies
                    os.close(a[0])
        self._auto_remove_later(cid)
        return 204, None

    def container_stop(self, req, w, c, id):
        t = int(req.arg("t", "10") or 10)
        with self.lock:
            cid = engine._resolve(id)
            if not engine._state(cid)[2]:
                return 304, None
        engine.stop(cid, timeout=t)
        return 204, None

    def container_kill(self, req, w, c, id):
        sig = str(req.arg("signal", "KILL") or "KILL").upper()
        try:
            num = signal_number(sig)
        except ValueError:
            raise HTTPError(400, f"invalid signal: {sig}") from None
        engine.kill(id, num)
        return 204, None

    def container_wait(self, req, w, c, id):
        """Answer when the container is not running (``not-running``), when it next exits (``next-exit``, what
        `docker run` asks before its start), or once it is removed as well (``removed``: `run --rm`)."""
        cond = req.arg("condition", "not-running") or "not-running"
        if cond not in ("not-running", "next-exit", "removed"):
            raise HTTPError(400, f"invalid condition {cond!r}: not-running, next-exit or removed")
        cid = engine._resolve(id)
        st, ex, running = engine._state(cid)
        last = ex
        # Docker answers the headers at once (the CLI waits for them before its start), the body when the
        # condition is met: chunked
        w.write(("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                 f"Api-Version: {API_VERSION}\r\nServer: labkit\r\n\r\n").encode())
        # stopped: not running, and either its exit is recorded or it never started (a process that has just
        # ended is not running before its monitor has written its exit: that is waited for)
        if cond != "not-running" or running or (st is not None and ex is None):
            before = (ex or {}).get("finished") if (cond != "not-running" and not running) else None
            lost = None  # since when it has been started, not running, and without an exit record
            while not _gone(c):
                try:
                    st, ex, running = engine._state(cid)
                except NotFound:  # removed meanwhile (auto-remove): it has exited
                    break
                last = ex or last
                if ex and not running and (cond == "not-running" or ex.get("finished") != before):
                    break
                if st is not None and not running and not ex:
                    lost = lost or time.monotonic()
                    if time.monotonic() - lost > 2:  # its supervisor was killed (labkit cleanup): no exit code
                        return self._wait_answer(w, cid, cond, c, -1, "the container's monitor was killed "
                                                 "before it could record the exit code")
                else:
                    lost = None
                time.sleep(0.02)
        code = (last or {}).get("exit_code")
        return self._wait_answer(w, cid, cond, c, code if code is not None else 0, None)

    def _wait_answer(self, w, cid, cond, c, code, error):
        if cond == "removed":
            while not _gone(c):
                try:
                    engine._resolve(cid)
                except NotFound:
                    break
                time.sleep(0.02)
        body = json.dumps({"StatusCode": code, "Error": {"Message": error} if error else None}).encode() + b"\n"
        w.write(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        return _ANSWERED

    def container_logs(self, req, w, c, id):
        """The container's log (labkit keeps stdout and stderr in one file: both come as stream 1), sent in
        pieces, never read whole into memory; ``tail``, ``follow``. Other options are refused."""
        cid = engine._resolve(id)
        if not (req.flag("stdout") or req.flag("stderr")):
            raise HTTPError(400, "you must choose at least one stream (stdout=1 or stderr=1)")
        for opt in ("since", "until"):
            if req.arg(opt) not in (None, "", "0"):
                raise HTTPError(400, f"labkit's logs have no time stamps: {opt} cannot be served")
        if req.flag("timestamps"):
            raise HTTPError(400, "labkit's logs have no time stamps (leave out -t)")
        path = f"{engine.roots.container_dir(cid)}/container.log"
        tail = req.arg("tail", "all") or "all"
        if tail != "all" and not re.fullmatch(r"-?[0-9]+", tail):
            raise HTTPError(400, f"tail {tail!r}: a number of lines, or all")
        self._stream_head(w)
        try:
            f = open(path, "rb")
        except FileNotFoundError:  # never started: nothing logged yet
            f = None
        offset = 0
        if f is not None:
            with f:
                if tail != "all" and int(tail) >= 0:
                    offset = _tail_offset(f, int(tail))
                f.seek(offset)
                while True:
                    data = f.read(1 << 20)
                    if not data:
                        break
                    w.write(_frame(data))
                offset = f.tell()
        if req.flag("follow"):
            self._follow(cid, path, offset, w, c)
        return _HIJACKED

    def container_top(self, req, w, c, id):
        if req.arg("ps_args") not in (None, "", "-ef"):
            raise HTTPError(400, f"labkit's top lists PID, UID and CMD (ps -ef's): ps options "
                                 f"{req.arg('ps_args')!r} are not taken; leave them out")
        return {"Titles": ["PID", "UID", "CMD"],
                "Processes": [[str(p["pid"]), str(p["uid"]), p["cmd"]] for p in engine.top(id)]}

    def container_attach(self, req, w, c, id):
        """The hijacked stream of ``docker attach`` and ``docker run``. Output of a container without a terminal is
        its log, followed here (multiplexed); with a terminal (-t) the supervisor sends it raw, and with stdin
        (-i, the container made with OpenStdin) the supervisor takes what the client sends: it gets this
        connection (SCM_RIGHTS), now if the container runs, with the start if it does not yet."""
        since = time.time()  # before the client hears back (and starts it): a run before this is not the one
        cid = engine._resolve(id)
        cfg = engine._config(cid)
        tty = bool(cfg.get("tty"))
        stdin = req.flag("stdin") and bool(cfg.get("open_stdin"))  # Docker's rule: no OpenStdin, no stdin
        keys = _detach_keys(req.arg("detachKeys"))  # (checked always, as dockerd does; used with a terminal's keys)
        keys = keys if tty and stdin else None
        to_supervisor = tty or stdin
        path = f"{engine.roots.container_dir(cid)}/container.log"
        # logs=1: what it wrote before, then what it writes (a terminal's too, from the log, before the live stream)
        offset = 0 if req.flag("logs") else os.path.getsize(path) if os.path.exists(path) else 0
        follow = req.flag("stream") and not tty
        if follow:
            self._hold(cid)  # before the client hears back and starts it: an auto-remove waits for this stream
        if to_supervisor and req.flag("stream"):
            fd = os.dup(c.fileno())
            try:
                with self.lock:  # (a start in progress holds it: the check and the append are one step)
                    running = engine._state(cid)[2]
                    if not running:  # before the 101: the client starts it only once it has heard back
                        with self.lock_attached:
                            waiting = self.pending.setdefault(cid, [])
                            if len(waiting) >= 32:
                                raise HTTPError(409, f"32 clients already wait for {cid} to start")
                            waiting.append((fd, stdin, tty and req.flag("stdout"), keys))
                            fd = None
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
        w.write(b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
                b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
        if req.flag("logs") and not follow and os.path.exists(path):  # the log as it is, before anything live
            with open(path, "rb") as f:
                while True:
                    data = f.read(1 << 20)
                    if not data:
                        break
                    w.write(data if tty else _frame(data))
        if to_supervisor and req.flag("stream") and fd is not None:
            try:
                engine.attach(cid, fd, stdin, tty and req.flag("stdout"), keys)
            finally:
                os.close(fd)
        if follow:
            # (a container that already runs is followed to its end; one not running yet, from its next start)
            self._follow(cid, path, offset, w, c, wait_start=not engine._state(cid)[2], held=True,
                         since=since)
        return _HIJACKED

    def container_resize(self, req, w, c, id):
        engine.resize(id, int(req.arg("h") or 0), int(req.arg("w") or 0))
        return 200, None

    # -- exec -----------------------------------------------------------------------------------------------
    EXEC_FIELDS = {"AttachStdin", "AttachStdout", "AttachStderr", "Tty", "Cmd", "Env", "WorkingDir", "ConsoleSize",
                   "DetachKeys", "Privileged", "User"}
    EXECS_KEPT = 256

    def exec_create(self, req, w, c, id):
        """`docker exec`, first half: what to run (kept here, as dockerd keeps it), nothing started yet."""
        body = req.json()
        unsupported = [k for k, v in body.items() if k not in self.EXEC_FIELDS and not _empty(v)]
        unsupported += [k for k in ("Privileged", "User") if not _empty(body.get(k))]
        detach = _detach_keys(body.get("DetachKeys"))
        if unsupported:
            raise HTTPError(400, f"labkit's Engine API does not do exec's {', '.join(sorted(unsupported))} (yet): "
                                 "leave them out")
        cmd = body.get("Cmd")
        if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
            raise HTTPError(400, "Cmd must be a non-empty list of strings, e.g. [\"sh\"]")
        env = {}
        for e in body.get("Env") or []:
            k, sep, v = str(e).partition("=")
            if not sep:
                raise HTTPError(400, f"Env entry {e!r} has no '=': write NAME=VALUE")
            env[k] = v
        cwd = body.get("WorkingDir") or None
        if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
            raise HTTPError(400, "WorkingDir must be an absolute path")
        size = body.get("ConsoleSize")
        if size is not None and not (isinstance(size, list) and len(size) == 2 and
                                     all(isinstance(x, int) and 0 <= x < 10000 for x in size)):
            raise HTTPError(400, "ConsoleSize must be [height, width]")
        cid = engine._resolve(id)
        if not engine._state(cid)[2]:
            raise HTTPError(409, f"Container {cid} is not running")
        eid = os.urandom(32).hex()
        with self.lock_execs:
            # the oldest of those not running go first (ended, or never started), as many as are over the mark
            old = sorted((e["created"], k) for k, e in self.execs.items() if not e["running"])
            for _, k in old[:max(0, len(self.execs) - self.EXECS_KEPT + 1)]:
                del self.execs[k]
            if len(self.execs) >= 4 * self.EXECS_KEPT:
                raise HTTPError(503, f"{len(self.execs)} execs are running: wait for some to end")
            self.execs[eid] = {"created": time.monotonic(), "cid": cid, "cmd": cmd, "env": env, "cwd": cwd, "tty": bool(body.get("Tty")),
                               "stdin": bool(body.get("AttachStdin")), "stdout": bool(body.get("AttachStdout")),
                               "stderr": bool(body.get("AttachStderr")), "size": size, "started": False, "detach": detach,
                               "detach_spec": body.get("DetachKeys") or "",
                               "running": False, "exit_code": None, "pid": 0, "master": None}
        return 201, {"Id": eid}

    def _exec(self, eid):
        ex = self.execs.get(eid)
        if ex is None:
            raise HTTPError(404, f"No such exec instance: {eid}")
        return ex

    def exec_start(self, req, w, c, id):
        """`docker exec`, second half: the program in the container's namespaces, root and cgroup
        (:mod:`labkit.agent.enter`), its streams on this hijacked connection: raw with a terminal (-t),
        multiplexed without; ``Detach``: started, not streamed."""
        body = req.json()
        with self.lock_execs:
            ex = self._exec(id)
            if ex["started"]:
                raise HTTPError(409, f"exec {id} has already been started")
            ex["started"] = True
        detach = bool(body.get("Detach"))
        try:
            spec, _ = engine._exec_spec(ex["cid"], ex["cmd"], "exec")
            spec["env"].update(ex["env"])
            spec["cwd"] = ex["cwd"] or spec["cwd"]
            # (detached: nobody reads it, so no terminal whose buffer would fill and stop the program)
            proc, master = enter.start_entered(spec, tty=ex["tty"] and not detach,
                                               stdin=ex["stdin"] and not detach, output=not detach)
        except BaseException:
            ex["exit_code"] = 126  # it never ran: not a success to whoever inspects it
            raise
        ex.update(running=True, pid=proc.pid, master=master)
        if master is not None and ex["size"] and all(ex["size"]):
            _winsize(master, *ex["size"])

        feeder = []

        def reap():
            code = proc.wait()
            ex.update(running=False, exit_code=code if code >= 0 else 128 - code)

        def ended():
            # the stream is over (the program's end, or the client's). The program's exit status is taken
            # first, and only then is the client told: the docker CLI asks for the exit code as soon as its
            # stream ends, and an exec still "running" then reads as 0. A program that outlives its output (or
            # a client that went away) is waited for a few seconds only; a thread of its own takes the status.
            # Then the client's input stops (the feeder joined, so nothing of it can land in a descriptor reused
            # after the close), a terminal's master is closed (SIGHUP to what still runs), pipes closed (EPIPE)
            t = threading.Thread(target=reap, daemon=True)
            t.start()
            t.join(5)
            try:
                c.shutdown(socket.SHUT_RDWR)  # wakes the feeder, tells the client
            except OSError:
                pass
            for f in feeder:
                f.join(10)
            ex["master"] = None
            if master is not None:
                os.close(master)
            for f in (proc.stdout, proc.stderr):
                if f is not None and not f.closed:
                    f.close()
            t.join(2)
        if detach:
            threading.Thread(target=reap, daemon=True).start()
            return 200, None
        if "upgrade" in req.headers.get("connection", "").lower():
            w.write(b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
                    b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
        else:
            self._stream_head(w)
        sink = master if master is not None else (proc.stdin.fileno() if proc.stdin else None)
        gone = threading.Event()  # detached: the program goes on, its terminal's output is read and dropped

        def feed():  # what the client types, to the program, until the client ends its input (or detaches)
            watch = Detach(ex["detach"]) if master is not None else None
            try:
                while True:
                    data = c.recv(65536)
                    if not data:
                        break
                    detached = False
                    if watch is not None:
                        data, detached = watch.feed(data)
                    kernel.write_all(sink, data)
                    if detached:
                        gone.set()
                        c.shutdown(socket.SHUT_RDWR)  # the client's stream ends here; the program's does not
                        break
            except OSError:
                pass
            finally:
                if proc.stdin is not None:
                    proc.stdin.close()
        if ex["stdin"] and sink is not None:
            feeder.append(threading.Thread(target=feed, daemon=True))
            feeder[0].start()
        def drain():  # detached: the terminal's output read and dropped until the program is done, then its end
            try:
                while os.read(master, 65536):
                    pass
            except OSError:
                pass
            finally:
                ended()
        handed = False
        try:
            if master is not None:
                import select
                while not gone.is_set():
                    if not select.select([master], [], [], 0.2)[0]:
                        continue
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # EIO: the program and all it started have closed the terminal
                        break
                    if not data:
                        break
                    try:
                        w.write(data)
                    except OSError:
                        if not gone.is_set():
                            raise
                if gone.is_set():  # this connection (and its place among the daemon's) is given back now
                    threading.Thread(target=drain, daemon=True).start()
                    handed = True
            else:
                _relay_frames(proc, w, ex["stdout"], ex["stderr"])
        finally:
            if not handed:
                ended()
        return _HIJACKED

    def exec_resize(self, req, w, c, id):
        ex = self._exec(id)
        if ex["master"] is None:
            raise HTTPError(409, f"exec {id} has no running terminal")
        _winsize(ex["master"], int(req.arg("h") or 0), int(req.arg("w") or 0))
        return 200, None

    def exec_inspect(self, req, w, c, id):
        ex = self._exec(id)
        return {"ID": id, "ContainerID": ex["cid"], "Running": ex["running"],
                "ExitCode": ex["exit_code"] if ex["exit_code"] is not None else (None if ex["running"] else 0),
                "Pid": ex["pid"], "OpenStdin": ex["stdin"], "OpenStdout": ex["stdout"], "OpenStderr": ex["stderr"],
                "CanRemove": False, "DetachKeys": ex["detach_spec"],
                "ProcessConfig": {"tty": ex["tty"], "entrypoint": ex["cmd"][0], "arguments": ex["cmd"][1:],
                                  "privileged": False, "user": ""}}

    def container_remove(self, req, w, c, id):
        with self.lock:
            cid = engine._resolve(id)
            engine.rm(cid, force=req.flag("force"))
        with self.lock_attached:
            for fd, *_ in self.pending.pop(cid, []):  # attached to a start that will never come
                os.close(fd)
        _drop_extra(cid)
        return 204, None

    # -- streams --------------------------------------------------------------------------------------------
    def _stream_head(self, w):
        w.write(("HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
                 f"Api-Version: {API_VERSION}\r\nConnection: close\r\n\r\n").encode())

    def _hold(self, cid):
        with self.lock_attached:
            self.attached[cid] = self.attached.get(cid, 0) + 1

    def _follow(self, cid, path, offset, w, conn, wait_start=False, held=False, since=None):
        """Send what the container writes to its log from ``offset`` until it has stopped (a start first, when
        ``wait_start``: an attach comes before the start), or the client has hung up. Reads at most every 50 ms;
        once the container has stopped, reads what is left (its output is all in the log by then). The log stays
        open once found, and an auto-remove waits for this stream (:meth:`_remove_when_done`)."""
        rt = f"{engine.RUNTIME}/{cid}"
        started = not wait_start
        since = time.time() if since is None else since  # a run before the attach is not the one to wait for
        f = None
        if not held:
            self._hold(cid)
        try:
            while not _gone(conn):
                if f is None:
                    try:
                        f = open(path, "rb")
                        f.seek(offset)
                    except FileNotFoundError:  # not started yet, or removed with its log
                        f = None
                data = f.read(1 << 20) if f is not None else b""
                if data:
                    w.write(_frame(data))
                    continue
                if not started:
                    st = read_json(f"{rt}/state.json", default=None)
                    started = isinstance(st, dict) and (st.get("started") or 0) >= since
                try:
                    stopped = started and os.path.exists(f"{rt}/exit.json") and not engine._state(cid)[2]
                except NotFound:
                    stopped = True
                if stopped:
                    while f is not None:
                        data = f.read(1 << 20)
                        if not data:
                            break
                        w.write(_frame(data))
                    return
                time.sleep(0.05)
        finally:
            if f is not None:
                f.close()
            with self.lock_attached:
                self.attached[cid] -= 1
                if not self.attached[cid]:
                    del self.attached[cid]

    # -- auto-remove ------------------------------------------------------------------------------------------
    def _auto_remove_later(self, cid):
        if (read_json(f"{EXTRA}/{cid}.json", default={}) or {}).get("auto_remove"):
            threading.Thread(target=self._remove_when_done, args=(cid,), daemon=True).start()

    def _remove_when_done(self, cid):
        while True:
            try:
                _, ex, running = engine._state(cid)
            except NotFound:
                return _drop_extra(cid)
            if ex and not running:
                break
            time.sleep(0.05)
        end = time.monotonic() + 10  # an attached client first reads the last of the output
        while self.attached.get(cid) and time.monotonic() < end:
            time.sleep(0.02)
        with self.lock:
            try:
                engine.rm(cid, force=True)
            except NotFound:
                pass
        _drop_extra(cid)

    def _watch_auto_remove(self):
        """A new daemon takes over what the last one watched: containers to remove when they stop."""
        if not os.path.isdir(EXTRA):
            return
        for f in os.listdir(EXTRA):
            cid = f[:-5]
            if f.endswith(".json") and re.fullmatch(r"[0-9a-f]{12}", cid):
                self._auto_remove_later(cid)

    # -- images ---------------------------------------------------------------------------------------------
    def images_list(self, req, w, c):
        import fnmatch
        filters = _filters(req, ("reference", "dangling"))
        # (all=1 lists the same: labkit keeps no intermediate images; RepoDigests stay empty: it keeps no digests)
        if "true" in (filters.get("dangling") or []):
            return []  # every image labkit keeps has a name
        out = []
        for i in store.list_images():
            if filters.get("reference") and not any(fnmatch.fnmatchcase(i["ref"], p) or
                                                    fnmatch.fnmatchcase(i["ref"].rsplit(":", 1)[0], p)
                                                    for p in filters["reference"]):
                continue
            out.append({"Id": "sha256:" + (i.get("id") or "").split(":")[-1], "ParentId": "", "RepoTags": [i["ref"]],
                        "RepoDigests": [], "Created": int(i.get("created") or 0), "Size": i["size"],
                        "VirtualSize": i["size"], "SharedSize": -1, "Labels": {}, "Containers": -1})
        return out

    def image_inspect(self, req, w, c, name):
        img = _image(name)
        return {"Id": "sha256:" + (img.get("id") or "").split(":")[-1], "RepoTags": [img.get("ref", name)],
                "Config": img.get("config"), "Os": "linux", "Architecture": _arch(),
                "RootFS": {"Type": "layers", "Layers": list(img.get("layers") or [])}}

    def image_pull(self, req, w, c):
        src = req.arg("fromImage")
        if not src:
            raise HTTPError(400, "fromImage: which image to pull")
        if req.arg("fromSrc") or req.arg("repo") or req.arg("platform"):
            raise HTTPError(400, "labkit pulls from a registry only (no import, no platform choice)")
        tag = req.arg("tag") or ""
        if not tag:
            raise HTTPError(400, "labkit pulls one tag at a time (no --all-tags): name it")
        ref = f"{src}@{tag}" if tag.startswith("sha256:") else f"{src}:{tag}"
        try:
            ImageRef.parse(ref)
        except LabkitError as exc:
            raise HTTPError(400, exc.message) from None
        self._stream_head(w)
        _progress(w, {"status": f"Pulling from {ImageRef.parse(ref)}"})
        try:
            res = registry.pull(ref)  # (not under the engine's lock: the store's own lock guards what it stores)
            _progress(w, {"status": f"Status: {pull_status(res.get('facts'))} for {ImageRef.parse(ref)}",
                          "id": str(res.get("facts", {}).get("digest", ""))})
        except Exception as exc:  # noqa: BLE001 - after the head, an error can only go in the stream
            _stream_error(w, exc)
        return _HIJACKED

    def image_search(self, req, w, c):
        """`docker search [HOST:PORT/]TERM`: a registry's catalog when the term names one, Docker Hub's search
        otherwise (online only), as dockerd splits the term."""
        term = req.arg("term") or ""
        if not _empty(req.arg("filters")):
            raise HTTPError(400, "labkit's docker search takes no filters (--filter): leave them out")
        host, _, rest = term.partition("/")
        if rest and ("." in host or ":" in host or host == "localhost"):
            rows = registry.search(rest, host=host)
        else:
            rows = registry.search(term, host="docker.io")
        limit = int(req.arg("limit") or 25)
        return [{"name": r["name"], "description": r["description"], "star_count": r["stars"],
                 "is_official": r["official"], "is_automated": False} for r in rows[:max(1, min(limit, 100))]]

    def image_push(self, req, w, c, name):
        """`docker push`: the image's blobs the registry lacks, then its manifest, as a JSON progress stream.
        Credentials come as Docker sends them (X-Registry-Auth: base64url JSON with username and password)."""
        ref = f"{name}:{req.arg('tag')}" if req.arg("tag") else name
        try:
            ref = str(ImageRef.parse(ref))
        except LabkitError as exc:
            raise HTTPError(400, exc.message) from None
        _image(ref)  # 404 before the stream starts, as dockerd answers
        user, password = _registry_auth(req.headers.get("x-registry-auth"))
        self._stream_head(w)
        _progress(w, {"status": f"The push refers to repository [{ref.rsplit(':', 1)[0]}]"})
        try:
            res = registry.push(ref, username=user, password=password)  # (reads the store only)
            for d in res["facts"]["pushed_blobs"]:
                _progress(w, {"status": "Pushed", "id": d.split(":")[-1][:12]})
            digest = res["facts"]["manifest"]
            _progress(w, {"status": f"{ref.rsplit(':', 1)[1]}: digest: {digest}"})
            _progress(w, {"aux": {"Tag": ref.rsplit(":", 1)[1], "Digest": digest}})
        except Exception as exc:  # noqa: BLE001 - after the head, an error can only go in the stream
            _stream_error(w, exc)
        return _HIJACKED

    BUILD_ARGS = {"t", "dockerfile", "nocache", "q", "rm", "forcerm", "version", "buildargs", "labels", "target",
                  "platform", "pull", "networkmode", "shmsize", "memory", "memswap", "cpushares", "cpusetcpus",
                  "cpuperiod", "cpuquota", "cachefrom", "extrahosts", "remote", "squash", "outputs", "session",
                  "buildid", "ulimits", "isolation", "cgroupparent", "securityopt", "cpusetmems"}
    BUILD_DEFAULTS = {"rm": ("1", "true"), "forcerm": ("0", "false"), "q": ("0", "false"), "version": ("1",),
                      "pull": ("0", "false", ""), "networkmode": ("default", ""), "shmsize": ("0",),
                      "memory": ("0",), "memswap": ("0",), "cpushares": ("0",), "cpuperiod": ("0",),
                      "cpuquota": ("0",), "buildargs": ("{}", "null", ""), "labels": ("{}", "null", ""),
                      "cachefrom": ("[]", "null", ""), "ulimits": ("null", "[]", ""), "target": ("",),
                      "platform": ("",), "cpusetcpus": ("",), "cpusetmems": ("",), "extrahosts": ("",),
                      "isolation": ("",), "cgroupparent": ("",), "securityopt": ("", "null", "[]"),
                      "session": None, "buildid": None, "outputs": ("", "null", "[]")}

    def image_build(self, req, w, c):
        """`docker build -t NAME DIR` (the classic builder): the context comes as a tar; labkit's recipe
        language is Dockerfile's FROM RUN COPY ENV WORKDIR CMD. Answered as Docker's JSON stream."""
        unsupported = [k for k, v in req.query.items() if k not in self.BUILD_ARGS or
                       (k in self.BUILD_DEFAULTS and self.BUILD_DEFAULTS[k] is not None and
                        str(v[-1]).lower() not in self.BUILD_DEFAULTS[k])]
        if req.arg("remote"):
            unsupported.append("remote")
        if unsupported:
            raise HTTPError(400, f"labkit's Engine API does not do build's {', '.join(sorted(unsupported))}: leave "
                                 "them out (labkit builds FROM RUN COPY ENV WORKDIR CMD)")
        tags = req.query.get("t") or []
        if not tags:
            raise HTTPError(400, "labkit builds need a name: docker build -t NAME")
        try:
            refs = [str(ImageRef.parse(t)) for t in tags]
        except LabkitError as exc:
            raise HTTPError(400, exc.message) from None
        files = _context_files(req.body)
        name = req.arg("dockerfile") or "Dockerfile"
        recipe = files.pop(name, None)
        if recipe is None:
            raise HTTPError(400, f"Cannot locate specified Dockerfile: {name}")
        self._stream_head(w)

        def say(text):
            _progress(w, {"stream": text})
        try:
            from . import build
            rec = build.build(recipe, refs[0], context=files, no_cache=req.flag("nocache"))  # (store's lock, shared)
            for extra in refs[1:]:
                store.tag(refs[0], extra)
            n = len(rec["steps"])
            for st in rec["steps"]:
                say(f"Step {st['step']}/{n} : {st['line']}\n")
                say(" ---> Using cache\n" if st["cached"] else f" ---> done in {st['seconds']:.2f}s\n")
            img_id = "sha256:" + (rec["image"].get("id") or "").split(":")[-1]
            _progress(w, {"aux": {"ID": img_id}})
            say(f"Successfully built {img_id.split(':')[1][:12]}\n")
            for ref in refs:
                say(f"Successfully tagged {ref}\n")
        except Exception as exc:  # noqa: BLE001 - after the head, an error can only go in the stream
            _stream_error(w, exc)
        return _HIJACKED

    def image_tag(self, req, w, c, name):
        repo = req.arg("repo")
        if not repo:
            raise HTTPError(400, "repo: the new name")
        with self.lock:
            store.tag(_image(name)["ref"], f"{repo}:{req.arg('tag') or 'latest'}")
        return 201, None

    def image_remove(self, req, w, c, name):
        with self.lock:
            ref = _image(name)["ref"]
            if not _names(name, ref):
                raise HTTPError(409, f"conflict: unable to delete {name} (must be forced) - image is referenced in "
                                     "multiple repositories")
            name = ref
            users = engine.image_in_use(name)
            if users and not req.flag("force"):
                raise HTTPError(409, f"conflict: unable to remove repository reference \"{name}\" (must force) - "
                                     f"container {users[0]} is using its referenced image")
            engine.rmi(name, force=req.flag("force"))  # (-f: the name goes; its containers keep their layers)
        return [{"Untagged": str(ImageRef.parse(name))}]

    # -- networks ---------------------------------------------------------------------------------------------
    def _network_json(self, n):
        return {"Name": n["spec"]["name"], "Id": n["spec"]["name"], "Driver": "bridge", "Scope": "local",
                "IPAM": {"Driver": "default", "Config": [{"Subnet": n["spec"].get("subnet"),
                                                          "Gateway": n.get("gateway", "")}]},
                "Containers": {k: {"IPv4Address": (v.get("ip") if isinstance(v, dict) else v) or ""}
                               for k, v in (n.get("members") or {}).items()}}

    NETWORK_FIELDS = {"Name", "Driver", "IPAM", "CheckDuplicate", "Attachable", "Internal", "EnableIPv6", "Options",
                      "Labels", "Ingress", "Scope", "ConfigOnly", "ConfigFrom"}

    def network_create(self, req, w, c):
        """`docker network create [--subnet S] NAME`: a labkit bridge network (a name of 1-8 letters or digits)."""
        body = req.json()
        unsupported = [k for k, v in body.items() if k not in {"Name", "Driver", "IPAM", "CheckDuplicate"}
                       and not _empty(v)]
        if body.get("Driver") not in (None, "", "bridge"):
            unsupported.append(f"Driver {body['Driver']!r} (labkit's networks are bridges)")
        ipam = body.get("IPAM") or {}
        configs = ipam.get("Config") or [] if isinstance(ipam, dict) else None
        if not isinstance(configs, list) or len(configs) > 1 or \
                any(not isinstance(x, dict) or set(k for k, v in x.items() if v) - {"Subnet"} for x in configs) or \
                ipam.get("Driver") not in (None, "", "default") or not _empty(ipam.get("Options")):
            unsupported.append("IPAM beyond one Subnet")
        if unsupported:
            raise HTTPError(400, f"labkit's Engine API does not do network create's {', '.join(sorted(unsupported))}: "
                                 "leave them out")
        name = body.get("Name")
        with self.lock:
            taken = [n["spec"] for n in network.list_networks()]
            if any(t["name"] == name for t in taken):
                raise HTTPError(409, f"network with name {name} already exists")
            subnet = configs[0].get("Subnet") if configs else _free_subnet([t["subnet"] for t in taken])
            try:
                spec = NetworkSpec(name=name, subnet=subnet)
            except LabkitError as exc:
                raise HTTPError(400, exc.message + (f" (fix: {exc.fix})" if exc.fix else "")) from None
            network.create(spec)
        return 201, {"Id": name, "Warning": ""}

    def network_inspect(self, req, w, c, name):
        return self._network_json(network.inspect(name))

    def network_remove(self, req, w, c, name):
        with self.lock:
            try:
                network.remove(name)
            except InvalidSpec as exc:  # still has members: Docker's 403 "has active endpoints"
                raise HTTPError(403, f"error while removing network: network {name} has active endpoints "
                                     f"({exc.message})") from None
        return 204, None

    def networks_list(self, req, w, c):
        filters = _filters(req, ("name",))
        return [self._network_json(n) for n in network.list_networks()
                if not filters.get("name") or any(p in n["spec"]["name"] for p in filters["name"])]


_HIJACKED = object()  # the route wrote its own answer and the connection ends with it
_ANSWERED = object()  # the route wrote its own answer; the connection goes on


def _gone(conn):
    """Whether the client has closed its end (not only its writing half, as the docker CLI does once it has
    nothing to send): a waiting or following answer then stops."""
    import select
    p = select.poll()
    p.register(conn, select.POLLHUP | select.POLLERR)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


_LOG_LOCK = threading.Lock()


def _access(req, what):
    """A line of the access log: time, method, path with its query, and the body's first bytes (a request's
    JSON is what the lab shows). Kept under MAX_ACCESS_LOG: the older half goes when it is full."""
    query = urllib.parse.urlencode({k: v[-1] for k, v in req.query.items()})
    body = req.body[:400].decode("utf-8", "replace").replace("\r", "\\r").replace("\n", "\\n") if req.body else ""
    line = (f"{time.strftime('%H:%M:%S')} {req.method} {req.raw_path}{'?' + query if query else ''}"
            f"{' ' + body if body else ''}\n")
    with _LOG_LOCK:
        try:
            if os.path.exists(ACCESS_LOG) and os.path.getsize(ACCESS_LOG) > MAX_ACCESS_LOG:
                with open(ACCESS_LOG, "rb") as f:
                    f.seek(-MAX_ACCESS_LOG // 2, os.SEEK_END)
                    keep = f.read()
                with open(ACCESS_LOG, "wb") as f:
                    f.write(keep[keep.find(b"\n") + 1:])
            fd = os.open(ACCESS_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "ab") as f:
                f.write(line.encode())
        except OSError:
            pass  # the log is for reading; it never stops an answer


def _drop_extra(cid):
    try:
        os.unlink(f"{EXTRA}/{cid}.json")
    except FileNotFoundError:
        pass


def _image(name):
    """An image by name (``busybox``, ``busybox:latest``) or by its ID (``sha256:...`` or a prefix of at least 4
    hex digits, as `docker images` shows it)."""
    try:
        return dict(store.load_image(name), ref=str(ImageRef.parse(name)))
    except (NotFound, InvalidSpec):
        pass
    key = name.split(":", 1)[1] if name.startswith("sha256:") else name
    if re.fullmatch(r"[0-9a-f]{4,64}", key):
        hits = [i for i in store.list_images() if (i.get("id") or "").split(":")[-1].startswith(key)]
        if len({i.get("id") for i in hits}) > 1:
            raise HTTPError(400, f"{name}: more than one image's ID begins so: give more of it")
        if hits:
            return dict(store.load_image(hits[0]["ref"]), ref=hits[0]["ref"])
    raise HTTPError(404, f"No such image: {name}")


def _names(name, ref):
    """Whether removing ``name`` removes exactly one name (``ref``): by name always; by ID only when the image
    has that one name."""
    key = name.split(":", 1)[1] if name.startswith("sha256:") else name
    if not re.fullmatch(r"[0-9a-f]{4,64}", key):
        return True
    img_id = (store.load_image(ref).get("id") or "").split(":")[-1]
    return sum(1 for i in store.list_images() if (i.get("id") or "").split(":")[-1] == img_id) == 1


def _filters(req, known):
    """The ``filters`` query parameter ({"name": ["web"]}, or the older {"name": {"web": true}}); a filter
    labkit does not apply is refused, never ignored."""
    text = req.arg("filters")
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        raise HTTPError(400, "filters must be JSON") from None
    if not isinstance(raw, dict):
        raise HTTPError(400, "filters must be a JSON object")
    out = {}
    for k, v in raw.items():
        if k not in known:
            raise HTTPError(400, f"labkit does not filter by {k!r} here: it filters by {', '.join(known)}")
        out[k] = [str(x) for x in (v.keys() if isinstance(v, dict) else v if isinstance(v, list) else [v])]
    return out


def _du(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _tail_offset(f, n):
    """Where the last ``n`` lines of an open file begin (read backwards, a block at a time)."""
    end = f.seek(0, os.SEEK_END)
    if n == 0:
        return end
    pos, seen, block = end, 0, 65536
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step)
        if pos + step == end and data.endswith(b"\n"):
            data = data[:-1]  # the final newline ends the last line, it does not start one
        for i in range(len(data) - 1, -1, -1):
            if data[i] == 10:
                seen += 1
                if seen == n:
                    return pos + i + 1
    return 0


def _empty(value):
    """Whether a request field holds only its default: nothing, zeros, false, empty strings, lists and objects."""
    if isinstance(value, dict):
        return all(_empty(v) for v in value.values())
    if isinstance(value, list):
        return all(_empty(v) for v in value)
    return value in (None, "", 0, False)


def _free_port(ip, proto):
    import socket
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _version(text):
    major, minor = text.split(".")
    return int(major), int(minor)


def _rfc3339(t):
    """Docker's time stamps: RFC 3339 in UTC with nanoseconds; its zero time for never."""
    if not t:
        return "0001-01-01T00:00:00Z"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e9):09d}Z"


def _arch():
    m = os.uname().machine
    return OCI_ARCH.get(m, m)  # Docker names architectures as the OCI image spec does


def _os_name():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Linux"
