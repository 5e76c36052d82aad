"""The engine: containers as Docker has them, made of labkit's mechanisms.

A container is an image's overlay root (:mod:`~labkit.agent.roots`), a cgroup with its limits
(:mod:`~labkit.agent.cgroups`), a process in its own namespaces with a pivot_root into that root
(:mod:`~labkit.agent.launch`), and an address on a labkit network with published ports
(:mod:`~labkit.agent.network`). The containers' supervisor (:mod:`~labkit.agent.supervisor`, one process for
all, as containerd-shim is one per container) forks its launcher, becomes its PID 1's parent, outlives the
client and the daemon, reaps it and writes the exit status; the program's stdout and stderr go straight
to the container's log file.

On disk: /var/lib/labkit/containers/<id>/ (config.json, image.json, upper/work/merged, container.log),
/var/lib/labkit/names/<name> -> <id> (atomic: no two containers get one name), /run/labkit/containers/<id>/
(state.json while it runs, exit.json when it ended). Standard library only.
"""
import json
import os
import re
import secrets
import shutil
import signal
import time

from ..wire.arch import CAPS, DOCKER_DEFAULT_CAPS, normalize_caps
from ..wire.errors import Conflict, InvalidSpec, LabkitError, MechanismError, NotFound
from ..wire.words import DETACHED, detach_keys
from ..wire.specs import CONTAINERS_DIR, RUN_DIR, STATE_DIR, ContainerSpec, ImageRef, NetworkSpec, PortSpec, ProcessSpec, check_name
from . import cgroups, enter, network, roots, store, supervisor, volumes
from .launch import CONTAINER_PATH
from .runner import Recorder, pid_fields, read_text, recorded_process, start_helper
from .state import private_dir, read_json, set_aside, write_json

NAMES = STATE_DIR + "/names"
RUNTIME = RUN_DIR + "/containers"
DETACH = detach_keys()  # Docker's Ctrl-P Ctrl-Q
#: every container's namespaces; one with no network (Docker's `--network none`) still has a network namespace of its
#: own, with only its loopback: never the host's interfaces and ports
NAMESPACES = ("uts", "pid", "mnt", "ipc", "net", "cgroup")


def _cg(cid):
    return "c-" + cid


def _resolve(ref):
    """Container id from an id, an id prefix or a name."""
    if not isinstance(ref, str) or not ref:
        raise InvalidSpec(f"{ref!r} is not a container name or id", fix="see `labkit ps -a`")
    if re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", ref) and ".." not in ref and os.path.islink(f"{NAMES}/{ref}"):
        cid = os.readlink(f"{NAMES}/{ref}")
        if re.fullmatch(r"[0-9a-f]{12}", cid):  # a name link made by create(); anything else is not ours
            return cid
    if re.fullmatch(r"[0-9a-f]{3,12}", ref) and os.path.isdir(CONTAINERS_DIR):
        hits = [c for c in os.listdir(CONTAINERS_DIR) if c.startswith(ref) and
                os.path.exists(f"{CONTAINERS_DIR}/{c}/config.json")]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InvalidSpec(f"{ref!r} matches several containers", fix="give more of the id, or the name")
    raise NotFound(f"no such container: {ref}", fix="see `labkit ps -a`")


def _config(cid):
    cfg = read_json(f"{CONTAINERS_DIR}/{check_name(cid, 'container id')}/config.json")
    if not isinstance(cfg, dict) or cfg.get("id") != cid:
        raise NotFound(f"no such container: {cid}", fix="see `labkit ps -a`")
    return cfg


def _env(cfg):
    return dict(e.split("=", 1) for e in cfg["env"])


def _state(cid):
    st = read_json(f"{RUNTIME}/{cid}/state.json")
    ex = read_json(f"{RUNTIME}/{cid}/exit.json")
    st = st if isinstance(st, dict) else None
    ex = ex if isinstance(ex, dict) else None
    running = bool(st and not ex and recorded_process(st))
    return st, ex, running


def capabilities(cap_add=(), cap_drop=(), privileged=False):
    """Docker's rule: the 14 default capabilities, plus ``cap_add``, minus ``cap_drop`` ('ALL' allowed in
    both); ``privileged`` keeps every one (None). Returns (sorted list or None, added, dropped), the last
    two normalised and without 'ALL' (as inspect shows them)."""
    def split(names):
        names = list(names or ())
        return any(str(c).upper() == "ALL" for c in names), normalize_caps(c for c in names if str(c).upper() != "ALL")

    add_all, add = split(cap_add)
    drop_all, drop = split(cap_drop)
    if privileged:
        return None, add, drop
    base = set() if drop_all else set(DOCKER_DEFAULT_CAPS)
    if add_all:
        base |= set(CAPS)
    return sorted((base | set(add)) - set(drop)), add, drop


def create(spec: ContainerSpec):
    """`docker create`: the root, the cgroup and the config, nothing running yet. Like Docker, a container
    keeps 14 capabilities and sees /proc/sys read-only unless ``privileged``."""
    ref = ImageRef.parse(spec.image)
    caps, cap_add, cap_drop = capabilities(spec.cap_add, spec.cap_drop, spec.privileged)
    img = store.load_image(ref)
    ports = [PortSpec.parse(p).to_dict() for p in spec.ports]
    for src, _, _ in spec.binds:
        if src.startswith("/") and not os.path.exists(src):
            raise InvalidSpec(f"volume source {src} does not exist on the target", fix="create it first")
    cid = secrets.token_hex(6)
    name = spec.name or f"{ref.name.split('/')[-1]}-{cid[:6]}"
    private_dir(NAMES)
    try:
        os.symlink(cid, f"{NAMES}/{name}")
    except FileExistsError:
        raise Conflict(f"the container name {name!r} is already in use by container "
                          f"{os.readlink(f'{NAMES}/{name}')}", fix="remove that container (labkit rm) or choose "
                          "another name") from None
    rec = Recorder(f"create container {name} from {ref}")
    try:
        # a volume named here is made now, as Docker makes it: once the name is this container's (a refused create
        # makes none)
        binds = volumes.resolve(spec.binds, rec)
        merged = roots.mount_container_root(img, cid, rec)
        d = roots.container_dir(cid)
        write_json(f"{d}/image.json", img)
        cg = cgroups.create(spec.cgroup(_cg(cid)))
        rec.steps += cg["steps"]
        cfg = {"id": cid, "name": name, "image": str(ref), "image_id": img["id"], "created": time.time(),
               "cmd": list(spec.cmd) if spec.cmd else list(img["config"].get("Cmd") or ["/bin/sh"]),
               "env": list(img["config"].get("Env") or []) + [f"{k}={v}" for k, v in spec.env],
               "hostname": spec.hostname or cid, "workdir": spec.workdir or img["config"].get("WorkingDir") or "/",
               "ports": ports, "binds": [list(b) for b in binds], "read_only": spec.read_only, "user": spec.user,
               "network": spec.network, "limits": {"memory": spec.memory, "nano_cpus": spec.nano_cpus,
                                                   "pids": spec.pids_limit},
               "caps": caps, "privileged": spec.privileged, "cap_add": cap_add, "cap_drop": cap_drop,
               "tty": spec.tty, "open_stdin": spec.open_stdin, "stdin_once": spec.stdin_once,
               "merged": merged, "upper": f"{d}/upper", "lowers": [store.layer_dir(x) for x in reversed(img["layers"])],
               "extra_hosts": [list(h) for h in spec.extra_hosts]}
        if spec.extra_hosts:  # its /etc/hosts: a file of the container's own, bound read-only at start (as Docker)
            _write_hosts(f"{d}/hosts", spec.extra_hosts)
        write_json(f"{d}/config.json", cfg, indent=1)
    except BaseException:
        _teardown(cid, rec)
        os.unlink(f"{NAMES}/{name}")
        raise
    return rec.to_dict(id=cid, name=name)


def _write_hosts(path, pairs):
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{name}" for name, ip in pairs]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _binds(cid, cfg):
    """Its volumes, and its own /etc/hosts where it has extra hosts."""
    binds = [tuple(b) for b in cfg["binds"]]
    if cfg.get("extra_hosts"):
        binds.append((f"{roots.container_dir(cid)}/hosts", "/etc/hosts", True))
    return tuple(binds)


def _prepare(ref, mode):
    """Everything a start needs: the mounted root, the network, the spec, and the launcher's arguments."""
    cid = _resolve(ref)
    cfg = _config(cid)
    _, _, running = _state(cid)
    if running:
        raise Conflict(f"container {cfg['name']} is already running", fix="stop it first")
    rec = Recorder(f"start container {cfg['name']}")
    img = read_json(f"{roots.container_dir(cid)}/image.json")
    if not isinstance(img, dict) or not isinstance(img.get("layers"), list):
        raise NotFound(f"container {cfg['name']} has lost its image record", fix=f"remove it: labkit rm {cfg['name']}")
    roots.ensure_mounted(cid, img["layers"], rec)
    if cfg["network"]:
        try:
            network.inspect(cfg["network"])
        except NotFound:
            rec.steps += network.create(NetworkSpec(name=cfg["network"]))["steps"]
    env = _env(cfg)
    spec = ProcessSpec(argv=tuple(cfg["cmd"]), namespaces=NAMESPACES, hostname=cfg["hostname"][:63],
                       rootfs=cfg["merged"], root_mode="pivot_root", env=tuple(sorted(env.items())),
                       cwd=cfg["workdir"], cgroup=_cg(cid), network=cfg["network"] or None,
                       ports=tuple(f"{p['host_ip']}:{p['host_port']}:{p['container_port']}/{p['proto']}"
                                   for p in cfg["ports"]),
                       binds=_binds(cid, cfg), read_only=cfg["read_only"], user=cfg["user"],
                       cap_keep=tuple(cfg["caps"]) if cfg.get("caps") is not None else None,
                       proc_sys_ro="caps" in cfg and not cfg.get("privileged"), look=False,
                       tty=bool(cfg.get("tty")) and mode == "supervised")
    rt = f"{RUNTIME}/{cid}"
    private_dir(RUNTIME)
    private_dir(rt)
    for f in ("exit.json", "state.json", "start.json"):
        if os.path.exists(f"{rt}/{f}"):
            os.unlink(f"{rt}/{f}")
    ctx = {"owner": cid, "exit_path": f"{rt}/exit.json", "cgroup_procs": cgroups.procs_files(_cg(cid))}
    ctx["cgroup_home"] = cgroups.home_procs_files(ctx["cgroup_procs"])
    args = [f"{rt}/start.json", json.dumps(spec.to_dict()), json.dumps(ctx), mode]
    return cid, cfg, rec, rt, args


def _started(cid, cfg, rec, rt, timeout):
    """Wait for the launcher's start report; record the running state."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = read_text(f"{rt}/start.json")
        if text:
            break
        time.sleep(0.005)
    else:
        raise MechanismError(f"container {cfg['name']} did not start within {timeout} s",
                             fix=f"see its log: labkit logs {cfg['name']}")
    report = json.loads(text)
    if report.get("error"):
        from ..wire.errors import from_wire
        raise from_wire(report["error"])
    state = {**pid_fields(report["pid"]), "started": time.time(), "net": report.get("net")}
    if report.get("monitor"):  # run -i: the launcher in the client's process is its parent
        state.update(pid_fields(report["monitor"], "monitor"))
    else:  # the supervisor of this code is its parent (its terminal, its stdin are there)
        state["supervisor"] = supervisor.identity()
    write_json(f"{rt}/state.json", state)
    rec.steps += report["steps"]
    rec.fact("pid", report["pid"])
    rec.fact("net", report.get("net"))
    return rec.to_dict(id=cid, name=cfg["name"])


def start(ref, timeout=30):
    """`docker start`: network, namespaces, cgroup, root; the supervisor becomes its PID 1's parent (and holds
    its terminal, with -t, or its stdin, with -i)."""
    return start_attached(ref, (), timeout)


def start_attached(ref, attach, timeout=30):
    """:func:`start`, with clients attached before the program runs (the Engine API's attach-then-start):
    ``attach`` = [(socket fd, stdin, stdout[, detach keys])], given to the supervisor with the start. Not an agent method:
    file descriptors do not cross the wire."""
    cid, cfg, rec, rt, args = _prepare(ref, "supervised")
    watch = {"owner": cid, "start": f"{rt}/start.json", "exit": f"{rt}/exit.json", "network": cfg["network"] or None,
             "tty": bool(cfg.get("tty")), "stdin": bool(cfg.get("open_stdin")),
             "stdin_once": bool(cfg.get("stdin_once"))}
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        with open(f"{roots.container_dir(cid)}/container.log", "ab") as log:
            launcher = supervisor.supervise(args, null, log.fileno(), log.fileno(), watch, attach)
    finally:
        os.close(null)
    try:
        code = launcher.wait(timeout)
    except TimeoutError:
        raise MechanismError(f"container {cfg['name']} did not start within {timeout} s",
                             fix=f"see its log: labkit logs {cfg['name']}") from None
    if code != 0 and not read_text(f"{rt}/start.json"):
        raise MechanismError(f"the launcher of {cfg['name']} failed (exit {code})",
                             fix=f"see its log: labkit logs {cfg['name']}")
    return _started(cid, cfg, rec, rt, timeout)


def run_attached(ref, timeout=30, detach=None):
    """`docker run -it`/`start -a`: returns the container's exit code. A container made with a terminal (-t)
    is started under the supervisor like any other, and this process attaches to its terminal as the docker
    CLI does (its keys in, its output out, the window's size); without one (-i alone) the container's stdio is
    this process's own. With -i and -t, typing the ``detach`` keys (bytes; Ctrl-P Ctrl-Q when None) leaves
    the container running without this terminal: :data:`~labkit.wire.words.DETACHED` is returned.

    Only for a client on the target itself (the CLI as root): over sudo or SSH, stdin and stdout carry
    the agent's protocol and cannot be handed to a container."""
    import threading
    cid = _resolve(ref)
    cfg = _config(cid)
    if cfg.get("tty"):
        import socket
        keys = bool(cfg.get("open_stdin"))
        ours, theirs = socket.socketpair()
        try:
            start_attached(cid, [(theirs.fileno(), keys, True)], timeout)
        finally:
            theirs.close()
        return _relay_to_end(cid, ours, keys, detach)
    cid, cfg, rec, rt, args = _prepare(ref, "attach")
    outcome = {}
    watcher = threading.Thread(target=lambda: outcome.update(started=_started(cid, cfg, rec, rt, timeout)),
                               daemon=True)
    watcher.start()
    # no new session: the terminal's Ctrl-C reaches the container's foreground, as with docker run -it
    proc = start_helper("launch", *args, stdin=None, stdout=None, stderr=None, new_session=False)
    with enter.terminal_signals_to_child():
        code = proc.wait()
    watcher.join(1)
    ex = read_json(f"{rt}/exit.json", default={})
    return ex.get("exit_code", code) if isinstance(ex, dict) else code


def _relay_to_end(cid, ours, keys, detach):
    """This terminal relayed to container ``cid``'s through ``ours`` (a socket the supervisor holds the other end
    of) until it ends (its exit code) or the detach keys are typed (:data:`~labkit.wire.words.DETACHED`)."""
    with ours:
        if enter.relay_terminal(ours.fileno(), lambda h, w: resize(cid, h, w), keys=keys,
                                detach=(detach or DETACH) if keys else None):
            return DETACHED
    # (a program that closed its terminal may run on: waited for, as the docker CLI waits; a supervisor that is
    # gone ends the wait within a second)
    _wait_exit(cid, 7 * 86400)
    return (_state(cid)[1] or {}).get("exit_code")


def attach_here(ref, detach=None):
    """`docker attach`: this terminal to running container ``ref``'s (made with -t), its keys in when it has a
    stdin (-i), until it ends (its exit code) or the detach keys are typed (DETACHED). Only for a client on the
    target itself, as :func:`run_attached`."""
    import socket
    cid = _resolve(ref)
    cfg = _config(cid)
    if not cfg.get("tty"):
        raise Conflict(f"container {cfg['name']} has no terminal to attach to (labkit attaches to -t containers)",
                       fix=f"follow its output: labkit logs -f {cfg['name']}")
    if cfg.get("open_stdin") and not os.isatty(0):  # Docker's rule and words, as for run -t
        raise LabkitError("the input device is not a TTY", fix="attach from a terminal", exit_code=1)
    ours, theirs = socket.socketpair()
    try:
        attach(cid, theirs.fileno(), bool(cfg.get("open_stdin")), True)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return _relay_to_end(cid, ours, bool(cfg.get("open_stdin")), detach)


def attach(ref, fd, stdin, stdout, detach=None):
    """A client's connection (``fd``) to running container ``ref``'s terminal (-t) or stdin (-i), through the
    supervisor that holds them (``detach``: keys, bytes, that end it when typed to a terminal). Not an agent
    method, as :func:`start_attached`."""
    cid = _resolve(ref)
    cfg = _config(cid)
    if not _state(cid)[2]:
        raise Conflict(f"container {cfg['name']} is not running", fix=f"start it: labkit start {cfg['name']}")
    if not (cfg.get("tty") or cfg.get("open_stdin")):
        raise Conflict(f"container {cfg['name']} has neither a terminal nor a stdin to attach to",
                       fix="create it with -t and/or -i")
    return supervisor.attach(cid, fd, stdin, stdout, _supervisor_of(cid), detach)


def _supervisor_of(cid):
    st = read_json(f"{RUNTIME}/{cid}/state.json", default={})
    return st.get("supervisor") if isinstance(st, dict) else None


def resize(ref, h, w):
    """`docker run -t`'s window size: rows ``h``, columns ``w`` of the container's terminal (SIGWINCH to it)."""
    cid = _resolve(ref)
    cfg = _config(cid)
    if not cfg.get("tty"):
        raise Conflict(f"container {cfg['name']} has no terminal", fix="create it with -t")
    return supervisor.resize(cid, h, w, _supervisor_of(cid))


def _wait_exit(cid, timeout):
    """Wait for the supervisor's exit record; True once the container has ended. When it was started, its process
    is gone and no record comes within a second (a supervisor killed: the container's status is lost with it), the
    container has ended all the same."""
    end = time.monotonic() + timeout
    gone = None
    while time.monotonic() < end:
        if os.path.exists(f"{RUNTIME}/{cid}/exit.json"):
            return True
        st = read_json(f"{RUNTIME}/{cid}/state.json", default=None)
        if isinstance(st, dict) and not recorded_process(st):
            gone = gone or time.monotonic()
            if time.monotonic() - gone > 1:
                return True
        time.sleep(0.01)
    return False


def stop(ref, timeout=10):
    """`docker stop`: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    cid = _resolve(ref)
    cfg = _config(cid)
    st, _, running = _state(cid)
    rec = Recorder(f"stop container {cfg['name']}")
    if running:
        rec.kill(st["pid"], signal.SIGTERM)
        if not _wait_exit(cid, timeout):
            rec.kill(st["pid"], signal.SIGKILL)
            _wait_exit(cid, 10)
    _, ex, _ = _state(cid)
    rec.fact("exit_code", (ex or {}).get("exit_code"))
    return rec.to_dict(id=cid, name=cfg["name"])


def kill(ref, sig=signal.SIGKILL):
    """`docker kill`: a signal to the container's process (SIGKILL unless told); refused when it does not run."""
    cid = _resolve(ref)
    cfg = _config(cid)
    st, _, running = _state(cid)
    if not running:
        raise Conflict(f"container {cfg['name']} is not running", fix=f"start it first: labkit start {cfg['name']}")
    rec = Recorder(f"kill container {cfg['name']}")
    rec.kill(st["pid"], int(sig))
    if int(sig) == signal.SIGKILL:
        _wait_exit(cid, 10)
    return rec.to_dict(id=cid, name=cfg["name"])


def wait(ref, timeout=3600):
    cid = _resolve(ref)
    _wait_exit(cid, timeout)
    _, ex, _ = _state(cid)
    return {"exit_code": (ex or {}).get("exit_code")}


def _teardown(cid, rec):
    try:
        cgroups.remove(_cg(cid))
    except LabkitError:
        pass
    roots.remove_container_root(cid, rec)


def rm(ref, force=False):
    """`docker rm`: refuse a running container unless ``force``; undo root, cgroup, name, state."""
    cid = _resolve(ref)
    cfg = _config(cid)
    _, _, running = _state(cid)
    rec = Recorder(f"remove container {cfg['name']}")
    if running and not force:
        raise Conflict(f"container {cfg['name']} is running", fix=f"stop it first (labkit stop {cfg['name']}) "
                          "or use rm -f")
    try:  # taken first: an auto-removal pending for it has nothing left to do
        os.unlink(f"{RUNTIME}/{cid}/{AUTO_REMOVE}")
    except OSError:
        pass
    if running:
        stop(cid, timeout=0)
    if cfg["network"]:
        network.disconnect(cfg["network"], cid)
    _teardown(cid, rec)
    for path in (f"{NAMES}/{cfg['name']}",):
        if os.path.islink(path) and os.readlink(path) == cid:
            os.unlink(path)
    try:  # (its report files only: labkit's own, in a directory only root can write)
        shutil.rmtree(f"{RUNTIME}/{cid}")
        rec.file("rmtree", f"{RUNTIME}/{cid}")
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MechanismError(f"could not remove {RUNTIME}/{cid}: {exc.strerror}", fix="run `labkit cleanup`") from None
    return rec.to_dict(id=cid, name=cfg["name"])


AUTO_REMOVE = "auto-remove"  # in a container's runtime directory: its supervisor removes it when it ends


def auto_remove(ref):
    """``run --rm`` for a container that goes on without its client (detached from ``run --rm -it`` with the
    detach keys): marked, and removed by its supervisor when it ends (:func:`main`), or now if it already has.
    (Both sides look after writing, so one of them sees the other's mark; whichever takes the mark away
    removes the container, so it is never removed twice at once.)"""
    cid = _resolve(ref)
    if not os.path.isdir(f"{RUNTIME}/{cid}"):
        raise NotFound(f"container {cid} has no run to remove it after", fix=f"remove it: labkit rm {cid}")
    with open(f"{RUNTIME}/{cid}/{AUTO_REMOVE}", "w"):
        pass
    if not _state(cid)[2]:
        _remove_marked(cid)
    return {"id": cid}


def _remove_marked(cid):
    """Remove ``cid`` if this caller is the one that takes its mark away; never a container that runs again
    (started anew since it ended: its new run is not this one's to end)."""
    try:
        os.unlink(f"{RUNTIME}/{cid}/{AUTO_REMOVE}")
    except FileNotFoundError:
        return  # not marked, or the other side has it
    try:
        rm(cid)
    except (NotFound, Conflict):
        pass  # removed meanwhile by the user, or running again


def main(argv=None):
    """``python -m labkit.agent.engine autoremove CID``: what the supervisor starts when a container marked by
    :func:`auto_remove` ends (a process of its own: a removal unmounts and deletes, which the supervisor's loop
    must not wait for)."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "autoremove" or not re.fullmatch(r"[0-9a-f]{12}", args[1]):
        print("usage: python -m labkit.agent.engine autoremove CONTAINER-ID", file=sys.stderr)
        return 2
    _remove_marked(args[1])
    return 0


def _row(cid):
    cfg = _config(cid)
    st, ex, running = _state(cid)
    state = "running" if running else "exited" if ex or st else "created"
    ports = ", ".join(f"{p['host_ip']}:{p['host_port']}->{p['container_port']}/{p['proto']}" for p in cfg["ports"])
    return {"id": cid, "name": cfg["name"], "image": cfg["image"], "command": " ".join(cfg["cmd"]),
            "created": cfg["created"], "state": state, "running": running, "ports": ports,
            "started": (st or {}).get("started") if running else None,
            "finished": ex.get("finished") if ex else None, "exit_code": ex.get("exit_code") if ex else None,
            "ip": ((st or {}).get("net") or {}).get("ip") if running else None}


def ps(all=False):
    """`docker ps [-a]`. A container whose config is missing or garbled is left out (its file set aside), not
    allowed to stop the listing of the others."""
    if not os.path.isdir(CONTAINERS_DIR):
        return []
    rows = []
    for c in sorted(os.listdir(CONTAINERS_DIR)):
        if not os.path.exists(f"{CONTAINERS_DIR}/{c}/config.json"):
            continue
        try:
            rows.append(_row(c))
        except NotFound:
            continue  # read_json set the garbled file aside and said so
        except (KeyError, TypeError, ValueError):
            set_aside(f"{CONTAINERS_DIR}/{c}/config.json", "does not hold a container config labkit wrote")
    return sorted([r for r in rows if all or r["running"]], key=lambda r: -r["created"])


def logs(ref, offset=0):
    cid = _resolve(ref)
    path = f"{roots.container_dir(cid)}/container.log"
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(1 << 20)
    _, _, running = _state(cid)
    return {"text": data.decode("utf-8", "replace"), "offset": offset + len(data), "running": running}


def top(ref):
    """The processes in the container's cgroup, as the host sees them (pid, uid, command).

    As `ps` shows them: a process caught exiting has no command line left (httpd's child for a request just
    served) and is shown by name, `[httpd]`; one gone meanwhile is left out."""
    cid = _resolve(ref)
    out = []
    for pid in cgroups.pids(_cg(cid)):
        status = read_text(f"/proc/{pid}/status")
        if status is None:
            continue
        field = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
        uid = (field.get("Uid") or "?").split()[0]
        cmd = (read_text(f"/proc/{pid}/cmdline") or "").replace("\0", " ").strip()
        if not cmd:
            cmd = f"[{field.get('Name', '').strip()}]"
        out.append({"pid": pid, "uid": uid, "cmd": cmd})
    return out


def inspect(ref):
    """A `docker inspect`-shaped view of the container."""
    cid = _resolve(ref)
    cfg = _config(cid)
    st, ex, running = _state(cid)
    net = (st or {}).get("net") or {}
    limits = cfg.get("limits") or {}
    return {
        "Id": cid, "Name": "/" + cfg["name"], "Created": cfg["created"], "Image": cfg["image_id"],
        "State": {"Status": "running" if running else ("exited" if ex or st else "created"), "Running": running,
                  "Pid": (st or {}).get("pid") if running else 0, "ExitCode": (ex or {}).get("exit_code"),
                  "StartedAt": (st or {}).get("started"), "FinishedAt": (ex or {}).get("finished")},
        "Config": {"Image": cfg["image"], "Cmd": cfg["cmd"], "Env": cfg["env"], "Hostname": cfg["hostname"],
                   "WorkingDir": cfg["workdir"], "User": cfg["user"] or "", "Tty": bool(cfg.get("tty")),
                   "OpenStdin": bool(cfg.get("open_stdin")), "StdinOnce": bool(cfg.get("stdin_once"))},
        # Docker's units: bytes, billionths of a CPU; 0 (and a null PidsLimit) where nothing is limited
        "HostConfig": {"Memory": limits.get("memory") or 0, "NanoCpus": limits.get("nano_cpus") or 0,
                       "Privileged": cfg.get("privileged", "caps" not in cfg), "CapAdd": list(cfg.get("cap_add") or []) or None,
                       "CapDrop": list(cfg.get("cap_drop") or []) or None,
                       "Capabilities": cfg.get("caps"),
                       "PidsLimit": limits.get("pids"), "Binds": [":".join([b[0], b[1]] + (["ro"] if b[2] else []))
                                                                      for b in cfg["binds"]],
                       "ReadonlyRootfs": cfg["read_only"],
                       "ExtraHosts": [f"{n}:{ip}" for n, ip in cfg.get("extra_hosts") or []] or None,
                       "PortBindings": {f"{p['container_port']}/{p['proto']}": [{"HostIp": p["host_ip"],
                                                                                 "HostPort": str(p["host_port"])}]
                                        for p in cfg["ports"]}},
        "NetworkSettings": {"IPAddress": net.get("ip", "") if running else "", "Gateway": net.get("gateway", "")
                            if running else "", "Network": cfg["network"]},
        "GraphDriver": {"Name": "overlay", "Data": {"LowerDir": ":".join(cfg["lowers"]), "UpperDir": cfg["upper"],
                                                     "MergedDir": cfg["merged"]}},
    }


def _exec_spec(ref, argv, what):
    cid = _resolve(ref)
    cfg = _config(cid)
    st, _, running = _state(cid)
    if not running:
        raise Conflict(f"container {cfg['name']} is not running", fix=f"start it: labkit start {cfg['name']}")
    if isinstance(argv, str) or not argv:
        raise InvalidSpec(f"argv must be a non-empty list, got {argv!r}", fix="e.g. ['ps']")
    namespaces = list(NAMESPACES)
    env = _env(cfg)
    env.setdefault("PATH", CONTAINER_PATH)
    spec = {"pid": st["pid"], "namespaces": namespaces, "procs": cgroups.procs_files(_cg(cid)), "cwd": cfg["workdir"],
            "env": env, "argv": [str(a) for a in argv], "cap_keep": cfg.get("caps")}
    rec = Recorder(f"{what} {list(argv)} in {cfg['name']}")
    rec.fact("joins", f"cgroup {_cg(cid)}, namespaces {', '.join(namespaces)} and the root of PID {st['pid']}")
    rec.fact("capabilities", "all (privileged)" if spec["cap_keep"] is None else spec["cap_keep"])
    return spec, rec


def exec_in(ref, argv, timeout=60):
    """`docker exec`: join the container's namespaces, root and cgroup (nsenter), run argv."""
    spec, rec = _exec_spec(ref, argv, "exec")
    # labkit.agent.enter: nsenter's work, plus the capability drop that nsenter cannot do
    res = enter.run_entered(spec, rec, timeout)
    return rec.to_dict(exit_code=res.exit_code, stdout=res.stdout, stderr=res.stderr)


def exec_attached(ref, argv, stdin=True, tty=False):
    """`docker exec -it`, ``-i``, ``-t``: argv in the container with this process's stdio; returns its exit code.
    With ``tty`` the program gets a terminal of the container's own, relayed to this one
    (:func:`labkit.agent.enter.relay_terminal`); without, this process's stdin (``stdin``) and stdout.
    Only for a client on the target itself, as run_attached."""
    spec, rec = _exec_spec(ref, argv, "exec -it")
    if not tty:
        return enter.run_attached(spec, stdin)
    from .kernel import set_winsize
    proc, master = enter.start_entered(spec, tty=True, stdin=stdin)
    try:
        enter.relay_terminal(master, lambda h, w: set_winsize(master, h, w), keys=stdin)
    finally:
        os.close(master)
    code = proc.wait()
    return code if code >= 0 else 128 - code


def image_in_use(ref):
    """Names of containers (any state) created from image ``ref``."""
    ref = str(ImageRef.parse(ref))
    return [r["name"] for r in ps(all=True) if r["image"] == ref]


def rmi(ref, force=False):
    """`docker rmi`: the one way to remove an image's name; refused while any container (running or not)
    was made from it. ``force`` (`rmi -f`) removes the name all the same, as Docker does for a name: the
    containers keep their layers (each its own image.json, which prune respects) and run or start as before."""
    if not isinstance(force, bool):
        raise InvalidSpec(f"force must be true or false, not {force!r}")
    ref = str(ImageRef.parse(ref))
    users = [r for r in ps(all=True) if r["image"] == ref]
    if users and not force:
        said = ", ".join(f"{r['name']} ({r['state']})" for r in users)
        raise Conflict(f"conflict: unable to remove image {ref}: it is used by container(s) {said}",
                       fix=f"remove the container first (labkit rm {users[0]['name']}): a stopped one still "
                           "holds its image; or rmi -f (the container keeps its layers)")
    return store.rmi(ref)


def cleanup(rec):
    """Kill every container's process (and an attached client's launcher), then the supervisor (cleanup's part
    for the engine)."""
    try:
        _kill_containers(rec)
    finally:
        supervisor.stop(rec)
    _forget_half_made(rec)


def _forget_half_made(rec):
    """A create cut short (its agent killed between reserving the name and writing the config) leaves a name
    link and a directory that no verb can reach (``ps`` skips it, its name stays taken): both go. Only
    directories named as create names them with no config at all (one set aside as corrupt stays, for whoever
    wants to see what it said), and links pointing at no directory."""
    if os.path.isdir(CONTAINERS_DIR):
        for cid in os.listdir(CONTAINERS_DIR):
            d = f"{CONTAINERS_DIR}/{cid}"
            if re.fullmatch(r"[0-9a-f]{12}", cid) and os.path.isdir(d) and \
                    not any(n.startswith("config.json") for n in os.listdir(d)) and not os.path.ismount(f"{d}/merged"):
                roots.remove_container_root(cid, rec)
    if os.path.isdir(NAMES):
        for name in os.listdir(NAMES):
            link = f"{NAMES}/{name}"
            if os.path.islink(link) and not os.path.isdir(f"{CONTAINERS_DIR}/{os.readlink(link)}"):
                os.unlink(link)
                rec.file("unlink", link)


def _kill_containers(rec):
    if not os.path.isdir(RUNTIME):
        return
    for cid in os.listdir(RUNTIME):
        st = read_json(f"{RUNTIME}/{cid}/state.json", default={})
        st = st if isinstance(st, dict) else {}
        for key in ("pid", "monitor"):
            # only the very process that was started: after a reboot or pid reuse the number is someone else's
            pid = recorded_process(st, key)
            if pid:
                rec.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    raise SystemExit(main())
