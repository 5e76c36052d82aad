"""The course's local registry: Debian's ``docker-registry`` serving on 127.0.0.1 (lab 06's "save and share").

:func:`start` uses a registry that already answers on the port (the lab VM's service) or starts one of labkit's
own: a config written here, its blobs under /var/lib/labkit/registry/data, listening on 127.0.0.1 only, its
process recorded (pid and start time) in /var/lib/labkit/registry/state.json. It runs as Debian's
``docker-registry`` service user (``nobody`` where there is none), never as root: a server that parses what
anyone on the machine sends it owns its data directory and nothing else (its config, log and state are root's). :func:`stop` ends only that
recorded process and, asked to, removes what was pushed to it; ``labkit cleanup`` does both. :func:`get` reads
the registry's own API (catalog, tags, manifests) for a notebook and for the grader's checks: GET only, to
127.0.0.1 only, a path of the distribution API only, bounded. The push and pull themselves are
:mod:`labkit.agent.registry`'s. Standard library only.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import time

from ..wire.errors import Conflict, InvalidSpec, MechanismError, NotFound
from ..wire.specs import STATE_DIR, CgroupSpec
from . import cgroups, runner
from .runner import Recorder, pid_fields, recorded_process, wait_gone, which
from .state import private_dir, read_json, write_json

DIR = f"{STATE_DIR}/registry"
STATE = f"{DIR}/state.json"
DEFAULT_PORT = 5000
#: the registry's cgroup (below labkit's parent): whatever it starts stays inside, and stop kills them all
CGROUP = "lk-registry"
MAX_BODY = 4 << 20
#: what :func:`get` may ask: the distribution API's read side (catalog, a repository's tags, a manifest)
API_PATH = re.compile(r"/v2/(_catalog|[a-z0-9]+(?:[._/-][a-z0-9]+)*/(tags/list|manifests/[A-Za-z0-9_.:-]{1,128}))"
                      r"(\?n=\d{1,4})?")


def _port(port):
    if not isinstance(port, int) or isinstance(port, bool) or not 1024 <= port <= 65535:
        raise InvalidSpec(f"{port!r} is not a port for the registry", fix="a number from 1024 to 65535, e.g. 5000")
    return port


def _ask(port, method, path, accept=None, timeout=5.0):
    """(status, headers, body) of one request to 127.0.0.1:``port`` (never through a proxy), all of it within
    ``timeout`` seconds (a server that trickles its answer is cut off); OSError when nothing answers there."""
    end = time.monotonic() + timeout
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        body = b""
        while len(body) <= MAX_BODY:
            if time.monotonic() > end:
                raise TimeoutError(f"the answer for {path} took more than {timeout:g} s")
            piece = resp.read1(65536)
            if not piece:
                break
            body += piece
        if len(body) > MAX_BODY:
            raise MechanismError(f"the registry on port {port} sent more than {MAX_BODY} bytes for {path}",
                                 fix="that is not the course's registry: stop it")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def _listener_uid(port):
    """The uid that owns the socket listening on 127.0.0.1:``port`` (or on every address), None when none does."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f_ = row.split()
            addr, hexport = f_[1].rsplit(":", 1)
            if f_[3] == "0A" and int(hexport, 16) == port and addr.strip("0") in ("", "100007F", "1000000"):
                return int(f_[7])
    return None


def _trusted_uids():
    """Who may run the registry labkit adopts: root, and Debian's docker-registry service user."""
    import pwd
    uids = {0}
    try:
        uids.add(pwd.getpwnam("docker-registry").pw_uid)
    except KeyError:
        pass
    return uids


def _is_registry(port):
    """True when a distribution registry answers /v2/ on the port, False when something else does, None when
    nothing listens."""
    try:
        status, headers, _ = _ask(port, "GET", "/v2/", timeout=2.0)
    except (OSError, http.client.HTTPException):
        with socket.socket() as s:  # nothing that speaks HTTP: is the port free?
            s.settimeout(1.0)
            return None if s.connect_ex(("127.0.0.1", port)) != 0 else False
    return status in (200, 401) and headers.get("docker-distribution-api-version", "").startswith("registry/2")


def _recorded():
    entry = read_json(STATE, default=None)
    return entry if isinstance(entry, dict) and recorded_process(entry) is not None else None


def status():
    """{'url', 'port', 'pid'} of labkit's own registry when it runs, else None."""
    entry = _recorded()
    if entry is None:
        return None
    return {"url": f"127.0.0.1:{entry['port']}", "port": entry["port"], "pid": entry["pid"]}


def start(port=DEFAULT_PORT, timeout=15.0):
    """The registry on 127.0.0.1:``port``, started when none answers there: {'url', 'port', 'pid',
    'started_here', 'steps'} (pid None for a registry labkit did not start)."""
    port = _port(port)
    rec = Recorder(f"a registry on 127.0.0.1:{port}")
    mine = _recorded()
    if mine is not None and mine["port"] == port and _is_registry(port):
        return rec.to_dict(url=f"127.0.0.1:{port}", port=port, pid=mine["pid"], started_here=False)
    found = _is_registry(port)
    if found and _listener_uid(port) not in _trusted_uids():
        raise Conflict(f"the registry on 127.0.0.1:{port} belongs to another user (uid {_listener_uid(port)})",
                       fix="images pulled from it could be anyone's: stop it, or use another port: "
                           "lab.registry(port=5001)")
    if found:
        rec.fact("already running", "a registry labkit did not start (the lab VM's service, say)")
        return rec.to_dict(url=f"127.0.0.1:{port}", port=port, pid=None, started_here=False)
    if found is False:
        raise Conflict(f"port {port} of 127.0.0.1 is taken by something that is not a registry",
                       fix="stop what listens there, or give the registry another port: lab.registry(port=5001)")
    if mine is not None:
        raise Conflict(f"labkit's registry already runs, on port {mine['port']}",
                       fix=f"use that one (lab.registry(port={mine['port']})) or stop it first: lab.registry().stop()")
    binary = which("docker-registry")
    if not binary:
        raise MechanismError("Debian's docker-registry is not installed on the target",
                             fix="apt-get install docker-registry (scripts/setup.sh and the lab VM install it)")
    user = service_user()
    rec.fact("user", user[2])
    st = os.stat(STATE_DIR)
    if not st.st_mode & 0o001:  # the service user passes through /var/lib/labkit (listing it stays root's)
        os.chmod(STATE_DIR, (st.st_mode & 0o7777) | 0o001)
    private_dir(DIR)
    os.chmod(DIR, 0o711)  # root's: the service user may pass through to its data, and read nothing else here
    data = _data_dir(user, rec)
    config = f"{DIR}/config.yml"
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n"
                f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
    os.chmod(config, 0o644)  # read by the service user, written by root alone
    log = os.open(f"{DIR}/registry.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    rec.steps += cgroups.create(CgroupSpec(name=CGROUP, pids=256))["steps"]
    try:
        proc = runner.start([binary, "serve", config], stdout=log, stderr=log, cwd="/", recorder=rec,
                            as_user=user[:2])
    finally:
        os.close(log)
    write_json(STATE, {**pid_fields(proc.pid), "port": port, "started": time.time()})
    try:  # in its cgroup before it serves anything: a process it forks later cannot outlive stop()
        for procs in cgroups.procs_files(CGROUP):
            with open(procs, "w") as f:
                f.write(str(proc.pid))
    except OSError as exc:
        stop(remove=False, rec=rec)
        raise MechanismError(f"could not put docker-registry in its cgroup: {exc}", fix="see `labkit doctor`") from None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            break
        if _is_registry(port):
            rec.fact("pid", proc.pid)
            return rec.to_dict(url=f"127.0.0.1:{port}", port=port, pid=proc.pid, started_here=True)
        time.sleep(0.05)
    stop(remove=True)
    raise MechanismError(f"docker-registry did not answer on 127.0.0.1:{port} within {timeout:g} s",
                         fix=f"see its log, {DIR}/registry.log, then try again")


def service_user():
    """(uid, gid, name) the registry runs as: Debian's docker-registry user, else nobody."""
    import pwd
    for name in ("docker-registry", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid != 0:
            return pw.pw_uid, pw.pw_gid, name
    raise MechanismError("there is neither a docker-registry nor a nobody user to run the registry as",
                         fix="apt-get install --reinstall docker-registry (it makes its user)")


def _data_dir(user, rec):
    """DIR/data, the service user's (0700): made, or taken over from a registry that ran as root (before labkit
    ran it as its own user). A tree already the user's is left as it is. Otherwise only root's part of it is
    walked (a directory of anyone else's is not entered): files are handed over as they are met and directories
    last, deepest first, so that every directory is still root's while root works in it and nothing in it can
    be swapped meanwhile; a file with a second hard link (a link to a file elsewhere) is never handed over."""
    import stat
    data = f"{DIR}/data"
    os.makedirs(data, mode=0o700, exist_ok=True)
    top = os.lstat(data)
    if not stat.S_ISDIR(top.st_mode):
        raise MechanismError(f"{data} is not a directory", fix="remove it (labkit cleanup), then start again")
    if top.st_uid == user[0]:
        return data
    later = []
    for path, dirs, files in os.walk(data):  # (os.walk follows no symbolic link to a directory)
        for name in list(dirs):
            st = os.lstat(os.path.join(path, name))
            if st.st_uid != 0:
                dirs.remove(name)  # not root's: not entered, not changed
            else:
                later.append(os.path.join(path, name))
        for name in files:
            full = os.path.join(path, name)
            st = os.lstat(full)
            if st.st_uid == 0 and not (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
                os.chown(full, user[0], user[1], follow_symlinks=False)
    for d in sorted(later, key=lambda p: p.count("/"), reverse=True):
        os.chown(d, user[0], user[1], follow_symlinks=False)
    os.chown(data, user[0], user[1], follow_symlinks=False)
    os.chmod(data, 0o700)
    rec.file("chown", data, f"{user[2]} (uid {user[0]})")
    return data


def stop(remove=False, rec=None):
    """End labkit's own registry (only the very process it recorded; a registry it did not start is left
    alone); ``remove``: what was pushed to it too. Returns {'stopped': pid or None, 'removed': bool, 'steps'}."""
    rec = rec or Recorder("stop labkit's registry")
    entry = read_json(STATE, default=None)
    pid = recorded_process(entry) if isinstance(entry, dict) else None
    if pid is not None:
        rec.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, entry.get("starttime"), 5):
            rec.kill(pid, signal.SIGKILL)
            wait_gone(pid, entry.get("starttime"), 5)
    try:  # and whatever it started: nothing of the service user's stays to listen in its place or play with its files
        rec.steps += cgroups.remove(CGROUP)["steps"]
    except NotFound:
        pass
    if os.path.lexists(STATE):
        os.unlink(STATE)
    removed = False
    if remove and os.path.isdir(DIR) and not os.path.islink(DIR):
        failed = []
        shutil.rmtree(DIR, onerror=lambda fn, path, exc: failed.append(path))
        rec.file("rmtree", DIR, f"could not remove {len(failed)} entries, e.g. {failed[0]}" if failed else "")
        removed = not failed
    return rec.to_dict(stopped=pid, removed=removed)


def get(path, port=DEFAULT_PORT):
    """One GET of the registry's own API on 127.0.0.1:``port``: {'status', 'digest' (Docker-Content-Digest),
    'json'}. Manifests are asked for in OCI's and Docker's v2 formats."""
    port = _port(port)
    if not isinstance(path, str) or not API_PATH.fullmatch(path):
        raise InvalidSpec(f"{path!r} is not a path of the registry API labkit reads",
                          fix="/v2/_catalog, /v2/NAME/tags/list or /v2/NAME/manifests/TAG")
    accept = ("application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
              if "/manifests/" in path else None)
    try:
        status_, headers, body = _ask(port, "GET", path, accept)
    except (OSError, http.client.HTTPException) as exc:
        raise MechanismError(f"no registry answers on 127.0.0.1:{port} ({exc})",
                             fix="start it: lab.registry()") from None
    try:
        parsed = json.loads(body) if body.strip() else None
    except ValueError:
        parsed = None
    return {"status": status_, "digest": headers.get("docker-content-digest"), "json": parsed}


def plan():
    """What ``labkit cleanup`` would remove of it."""
    items = []
    mine = status()
    if mine is not None:
        items.append(("registry", f"{mine['url']} (pid {mine['pid']})"))
    if os.path.isdir(DIR):
        items.append(("registry storage", DIR))
    return items


def cleanup(rec):
    return stop(remove=True, rec=rec)
