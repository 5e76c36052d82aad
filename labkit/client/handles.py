"""The live handles a :class:`~labkit.client.lab.Lab` hands out, one per kind of thing made on the target.

Each holds the record of what made it and undoes only that: ``Rootfs`` (remove, if this handle built
it), ``Process`` (stop), ``Cgroup`` (kill and remove), ``OverlayRoot`` (unmount and remove),
``Network`` (remove, if made here), ``Container`` (rm -f), ``VirtualMachine`` (stop). One ``__exit__``
policy for all (:class:`_Handle`); ``Lab.release`` calls the same undo. Standard library only.
"""
from ..wire.errors import InvalidSpec, LabkitError
from ..wire.specs import ImageRef
from .records import Record


def _argv(argv):
    if isinstance(argv, str):
        raise InvalidSpec(f"commands are lists of arguments, not strings: {argv!r}",
                          fix=f"write {argv.split()!r}, or ['sh', '-c', {argv!r}] for shell syntax")
    if not argv:
        raise InvalidSpec("the command is empty", fix="e.g. ['uname', '-r']")
    return [str(a) for a in argv]


def _rootfs_name(rootfs):
    return rootfs.name if isinstance(rootfs, Rootfs) else rootfs


def _spec_kw(kw):
    if "rootfs" in kw:
        kw["rootfs"] = _rootfs_name(kw["rootfs"])
    if isinstance(kw.get("cgroup"), Cgroup):
        kw["cgroup"] = kw["cgroup"].name
    if isinstance(kw.get("network"), Network):
        kw["network"] = kw["network"].name
    if "ports" in kw:
        kw["ports"] = tuple(kw["ports"])
    if isinstance(kw.get("env"), dict):
        kw["env"] = tuple(sorted(kw["env"].items()))
    return kw


class _Handle:
    """Common to live handles: shows its record in a notebook; ``with`` undoes what it made (``_undo``)."""

    record = None

    def _repr_html_(self):
        return self.record._repr_html_()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # One policy for every handle: undo what it made. When the block is already failing, that
        # error is the one to see: an undo that fails too is attached to it as a note, not raised.
        try:
            self._undo()
        except LabkitError as undo_error:
            if exc is None:
                raise
            if hasattr(exc, "add_note"):
                exc.add_note(f"and undoing {self!r} failed too: {undo_error}")
        return False

    def _undo(self):
        """Undo what this handle made (idempotent: a second call does nothing more)."""
        raise NotImplementedError


class Rootfs(_Handle):
    """A rootfs under /var/lib/labkit/rootfs/<name>. ``with`` removes it when the block ends
    (only if this handle built it: a rootfs that already existed is left as it was)."""

    def __init__(self, lab, spec, record):
        self.lab, self.spec, self.record = lab, spec, record
        self.name, self.path = spec.name, record.get("path") or spec.path
        self.created = not record.facts.get("existed", False)

    def __repr__(self):
        return f"<Rootfs {self.name} at {self.path}>"

    def listdir(self, sub="/"):
        return self.lab.list_dir(self.path + "/" + sub.lstrip("/"))["entries"]

    def read(self, sub):
        return self.lab.read_file(self.path + "/" + sub.lstrip("/"))

    def remove(self):
        return Record(self.lab.call("rootfs.remove", name=self.name))

    def _undo(self):
        if self.created:
            self.remove()


class Network(_Handle):
    """A labkit bridge network. ``with`` removes it (once no process is on it) if this handle made it."""

    def __init__(self, lab, spec, record):
        self.lab, self.spec, self.record = lab, spec, record
        self.name, self.bridge = spec.name, spec.bridge
        self.created = not record.facts.get("existed", False)
        self.gateway = record["network"]["gateway"]

    def inspect(self):
        return Record(self.lab.call("net.inspect", name=self.name))

    def remove(self):
        return Record(self.lab.call("net.remove", name=self.name))

    def __repr__(self):
        return f"<Network {self.name} {self.spec.subnet} on {self.bridge}>"

    def _undo(self):
        if self.created:
            self.remove()


class OverlayRoot(_Handle):
    """A container's overlay root (image layers + its own upper dir). ``with`` unmounts and removes it."""

    def __init__(self, lab, name, record):
        self.lab, self.name, self.record = lab, name, record
        self.merged, self.upper, self.image = record["merged"], record["upper"], record["image"]

    @property
    def lowerdirs(self):
        return self.record.facts.get("lowerdirs", [])

    def run(self, argv, namespaces=("uts", "pid", "mnt", "ipc", "net"), **kw):
        """Run ``argv`` with this root (pivot_root in its own mount namespace) to completion."""
        kw.setdefault("root_mode", "pivot_root")
        return self.lab.run_in(argv, namespaces, rootfs=self.merged, **kw)

    def changes(self):
        """What the container changed, as overlayfs keeps it in the upper dir (files, whiteouts, opaque dirs)."""
        return self.lab.call("overlay.changes", cid=self.name)

    def commit(self, ref, message="commit"):
        """The upper dir becomes a new layer on top of the image's: a new image ``ref``."""
        return Record(self.lab.call("image.commit", cid=self.name, ref=str(ImageRef.parse(ref)), message=message))

    def remove(self):
        return Record(self.lab.call("overlay.remove", cid=self.name))

    def __repr__(self):
        return f"<OverlayRoot {self.name} of {self.image} at {self.merged}>"

    def _undo(self):
        self.remove()


class Cgroup(_Handle):
    """A labkit cgroup with limits. ``with`` kills what is inside and removes it when the block ends."""

    def __init__(self, lab, spec, record):
        self.lab, self.spec, self.record = lab, spec, record
        self.name = spec.name

    @property
    def mode(self):
        return self.record.get("mode")

    def run(self, argv, namespaces=(), **kw):
        """Run ``argv`` inside this cgroup (and any namespaces) to completion."""
        return self.lab.run_in(argv, namespaces, cgroup=self.name, **kw)

    def spawn(self, argv=(), namespaces=(), **kw):
        """Start a process inside this cgroup; returns a :class:`Process`."""
        return self.lab.spawn(argv, namespaces, cgroup=self.name, **kw)

    def stats(self):
        """The kernel's counters now: memory, OOM kills, CPU time and throttling, pids."""
        return Record(self.lab.call("cgroup.stats", name=self.name))

    def limits(self):
        """The memory and pids limits the kernel holds for this group now (None: no limit)."""
        s = self.stats()
        mem = s.get("memory_max")
        return {"memory": mem if mem is not None and mem < 1 << 60 else None, "pids": s.get("pids_max")}

    def sample(self, seconds=3.0, interval=0.25):
        """stats() every ``interval`` s for ``seconds`` s, as a pandas DataFrame (one row per sample)."""
        import pandas as pd
        df = pd.DataFrame(self.lab.call("cgroup.sample", name=self.name, seconds=seconds, interval=interval))
        df["t"] = df["time"] - df["time"].iloc[0]
        return df

    def kill(self):
        return Record(self.lab.call("cgroup.kill", name=self.name))

    def remove(self):
        return Record(self.lab.call("cgroup.remove", name=self.name))

    def __repr__(self):
        return f"<Cgroup {self.name} ({self.mode})>"

    def _undo(self):
        self.remove()


class VirtualMachine(_Handle):
    """A running VM (qemu) on the target. ``exec`` runs a shell command in the guest; ``with`` stops it."""

    def __init__(self, lab, vm_id, record):
        self.lab, self.id, self.record = lab, vm_id, record
        self.accel = record.facts.get("accel")
        self.ip = record.get("ip")

    def exec(self, command, timeout=300):
        """Run ``command`` (busybox sh) in the guest: {'stdout', 'exit_code', 'duration'}."""
        return Record(self.lab.call("vm.exec", vm_id=self.id, command=command, timeout=timeout))

    def footprint(self):
        """qemu's RSS and PSS on the host and the guest's own MemTotal/MemAvailable (KiB)."""
        return Record(self.lab.call("vm.footprint", vm_id=self.id))

    def stop(self):
        return Record(self.lab.call("vm.stop", vm_id=self.id))

    def __repr__(self):
        return f"<VirtualMachine {self.id} ({(self.accel or '?').upper()}, kernel {self.record.facts.get('kernel')})>"

    def _undo(self):
        self.stop()


class Container(_Handle):
    """A container on the target. ``with`` removes it (rm -f) when the block ends."""

    def __init__(self, lab, cid, name, record):
        self.lab, self.id, self.name, self.record = lab, cid, name, record

    def start(self):
        self.record = Record(self.lab.call("container.start", ref=self.id))
        return self

    def stop(self, timeout=10):
        return Record(self.lab.call("container.stop", ref=self.id, timeout=timeout))

    def wait(self, timeout=3600):
        return self.lab.call("container.wait", ref=self.id, timeout=timeout)

    def rm(self, force=False):
        return Record(self.lab.call("container.rm", ref=self.id, force=force))

    def logs(self):
        return self.lab.call("container.logs", ref=self.id)["text"]

    def top(self):
        return self.lab.call("container.top", ref=self.id)

    def inspect(self):
        return self.lab.call("container.inspect", ref=self.id)

    def exec(self, argv, timeout=60):
        return Record(self.lab.call("container.exec", ref=self.id, argv=_argv(argv), timeout=timeout))

    def commit(self, ref):
        return Record(self.lab.call("image.commit", cid=self.id, ref=str(ImageRef.parse(ref)), message=f"from {self.name}"))

    @property
    def ip(self):
        return self.inspect()["NetworkSettings"]["IPAddress"]

    @property
    def status(self):
        return self.inspect()["State"]["Status"]

    def __repr__(self):
        return f"<Container {self.name} {self.id}>"

    def _undo(self):
        self.rm(force=True)


class Process(_Handle):
    """A process started in namespaces. ``with`` stops it when the block ends."""

    def __init__(self, lab, pid_id, record):
        self.lab, self.id, self.record = lab, pid_id, record

    @property
    def pid(self):
        """Its PID on the host."""
        return self.record.get("pid") or self.record.facts.get("pid")

    @property
    def view(self):
        """What the process saw from inside just before it started its program."""
        return self.record.facts.get("view")

    def inspect(self):
        """Live state from the host: namespaces now, NSpid, uid_map, root, alive."""
        return Record(self.lab.call("proc.inspect", pid_id=self.id))

    def shares_with_host(self):
        return self.inspect().get("shares_with_host", {})

    def exec(self, argv, timeout=30):
        """Run ``argv`` inside this process's namespaces, root and cgroup, with its capabilities."""
        return Record(self.lab.call("proc.exec", pid_id=self.id, argv=_argv(argv), timeout=timeout))

    def stop(self, timeout=None):
        """SIGTERM, then SIGKILL after ``timeout`` s (default 5; 0 for a process that only holds namespaces)."""
        return Record(self.lab.call("proc.stop", pid_id=self.id, timeout=timeout))

    def __repr__(self):
        return f"<Process {self.id} pid {self.pid}>"

    def _undo(self):
        self.stop()


#: a small HTTP/1.1 client over a unix socket, run with the target's python3 (what `curl --unix-socket` does):
#: argv socket method path [body]; prints the status line, the headers and the body as they came
HTTP_UNIX = r'''
import socket, sys
path, method, target = sys.argv[1:4]
body = sys.argv[4].encode() if len(sys.argv) > 4 else b""
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(path)
head = f"{method} {target} HTTP/1.1\r\nHost: docker\r\nUser-Agent: labkit-lab\r\nConnection: close\r\n"
if body:
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
s.sendall(head.encode() + b"\r\n" + body)
data = b""
while True:
    piece = s.recv(65536)
    if not piece:
        break
    data += piece
sys.stdout.write(data.decode("utf-8", "replace"))
'''

#: one request on labkit's own wire (a unix socket, one JSON object per line), sent from the target: the agent's
#: hello, the request and the answer, each as the line that crossed the socket
WIRE_ONE = r'''
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
request = sys.stdin.buffer.readline(1 << 20).rstrip(b"\n")
f = s.makefile("rwb")
hello = f.readline(1 << 20)
f.write(request + b"\n")
f.flush()
answer = f.readline(1 << 20)
sys.stdout.write((hello + request + b"\n" + answer).decode("utf-8", "replace"))
'''


class Daemon(_Handle):
    """labkit's daemon on the target (:mod:`labkit.agent.daemon`): ``socket`` (labkit's protocol),
    ``docker_socket`` (Docker's Engine API) and ``docker_host`` (what DOCKER_HOST is set to). ``api(method,
    path, body)`` sends one raw REST request from the target and returns its status, headers and body;
    ``requests(n)`` the last requests the Engine API served; ``docker(*args)`` the real docker CLI on the target,
    pointed at it, where one is installed. ``with`` stops the daemon if this handle started it."""

    ACCESS_LOG = "/run/labkit/dockerapi.log"

    def __init__(self, lab, info):
        self.lab, self.info = lab, dict(info)
        self.pid, self.socket, self.docker_socket = info["pid"], info["socket"], info["docker_socket"]
        self.docker_host = f"unix://{self.docker_socket}"
        self.started_here = bool(info.get("started_here"))
        self.record = Record({"title": f"labkit's daemon (pid {self.pid})" + (", started now" if self.started_here
                                                                               else ", already running"),
                              "facts": {"protocol socket": self.socket, "Engine API socket": self.docker_socket}})

    def api(self, method, path, body=None):
        """One raw request to the Engine API, sent from the target: {'status', 'headers', 'body', 'json'}."""
        import json
        argv = ["python3", "-c", HTTP_UNIX, self.docker_socket, method.upper(), path]
        if body is not None:
            argv.append(body if isinstance(body, str) else json.dumps(body))
        res = self.lab.run(argv, timeout=60, check=True)
        head, _, text = res.stdout.partition("\r\n\r\n")
        lines = head.split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        if headers.get("Transfer-Encoding") == "chunked":
            out, rest = "", text
            while rest:
                size, _, rest = rest.partition("\r\n")
                n = int(size or "0", 16)
                if n == 0:
                    break
                out, rest = out + rest[:n], rest[n + 2:]
            text = out
        try:
            parsed = json.loads(text) if text.strip() else None
        except ValueError:
            parsed = None
        return Record({"title": f"{method.upper()} {path}", "status": lines[0], "headers": headers, "body": text,
                       "json": parsed})

    def wire(self, method, **params):
        """One request on labkit's own socket, sent from the target as a client would: {'hello', 'request',
        'answer'}, each the raw JSON line that crossed the socket."""
        import json
        request = json.dumps({"id": 1, "method": method, "params": params})
        # (the request on stdin, not the command line: every local user can read a process's arguments)
        out = self.lab.run(["python3", "-c", WIRE_ONE, self.socket], input=request + "\n", timeout=60,
                           check=True).stdout
        lines = out.splitlines() + ["", "", ""]
        return Record({"title": f"{method} on {self.socket}", "hello": lines[0], "request": lines[1],
                       "answer": lines[2]})

    def requests(self, n=20):
        """The last ``n`` requests the Engine API served (time, method, path, the body's start), oldest first."""
        text = self.lab.call("read_file", path=self.ACCESS_LOG, limit=1 << 20)["text"]
        return text.splitlines()[-n:] if n else []

    DOCKER_CLI = "/usr/bin/docker"  # Debian's (the machine may carry another docker earlier on PATH)

    def docker_cli(self):
        """The path of Debian's docker CLI on the target, or None."""
        return self.DOCKER_CLI if self.lab.run(["test", "-x", self.DOCKER_CLI]).exit_code == 0 else None

    def docker(self, *args, timeout=120):
        """The real docker CLI on the target, with DOCKER_HOST pointed at this daemon."""
        cli = self.docker_cli()
        if cli is None:
            raise LabkitError("Debian's docker CLI is not installed on the target",
                              fix="apt-get install docker.io (only its client is used), or use d.api(...)")
        return self.lab.run(["env", f"DOCKER_HOST={self.docker_host}", "DOCKER_CONFIG=/run/labkit/docker-cli",
                             cli, *[str(a) for a in args]], timeout=timeout)

    def stop(self):
        """Stop the daemon (its containers go on running)."""
        return self.lab.call("daemon.stop")

    def _undo(self):
        if self.started_here:
            self.started_here = False
            self.stop()


class Registry(_Handle):
    """A registry on the target's 127.0.0.1 (:mod:`labkit.agent.localregistry`): ``url`` (host:port, the start of
    an image name that goes there, e.g. ``f"{reg.url}/alice/web:v1"``), ``started_here``; ``catalog()``,
    ``tags(repo)`` and ``digest(repo, tag)`` read the registry's own API. ``with`` (or ``close()``) stops it and
    removes what was pushed to it when this handle started it; a registry that already ran is left as it was."""

    def __init__(self, lab, info):
        self.lab, self.port, self.url = lab, info["port"], info["url"]
        self.pid, self.started_here = info.get("pid"), bool(info.get("started_here"))
        self.record = Record({"title": f"registry on {self.url}" + (f" (docker-registry, pid {self.pid}, started "
                                                                    "now)" if self.started_here else ", already running"),
                              "steps": info.get("steps", []), "facts": info.get("facts", {})})

    def get(self, path):
        """One GET of the registry's API: {'status', 'digest', 'json'}."""
        return self.lab.call("registry.get", path=path, port=self.port)

    def catalog(self):
        """The repositories it holds (GET /v2/_catalog)."""
        return list((self.get("/v2/_catalog")["json"] or {}).get("repositories") or [])

    def tags(self, repo):
        """The tags of ``repo`` (GET /v2/REPO/tags/list); [] for a repository it does not hold."""
        res = self.get(f"/v2/{repo}/tags/list")
        return list((res["json"] or {}).get("tags") or []) if res["status"] == 200 else []

    def digest(self, repo, tag):
        """The manifest digest the registry gives ``repo:tag`` (its Docker-Content-Digest), or None."""
        res = self.get(f"/v2/{repo}/manifests/{tag}")
        return res["digest"] if res["status"] == 200 else None

    def close(self):
        self._undo()

    def _undo(self):
        if self.started_here:
            self.started_here = False
            self.lab.call("registry.stop", remove=True)
