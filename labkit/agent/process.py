"""Processes in namespaces: run one to completion, or start one that outlives the client.

Each process is made by the launcher (:mod:`labkit.agent.launch`) in a fresh helper, never in the
agent itself. A started process gets a state entry in /run/labkit/procs/<id>.json (its host PID and
start time, so a recycled PID is never mistaken for it, plus any host mounts made for it); ``stop``
undoes exactly that entry and ``labkit cleanup`` undoes whatever entries are left.
Standard library only.
"""
import json
import os
import secrets
import signal
import subprocess
import tempfile
import time

from ..wire.errors import CommandTimeout, Conflict, InvalidSpec, MechanismError, NotFound, from_wire
from ..wire.specs import NAMESPACES, RUN_DIR, ProcessSpec, check_name
from . import cgroups, enter, network
from .launch import CONTAINER_PATH, undo_host_mounts
from .namespaces import host_context, inodes, shares
from .runner import (Recorder, pid_fields, read_text, recorded_process, run as run_cmd, start_helper,
                     wait_gone)
from .state import private_dir, read_dir, read_json, write_json

PROCS_DIR = RUN_DIR + "/procs"
REPORTS_DIR = RUN_DIR + "/reports"  # root's alone: nothing a local user could plant or forge
MARKER = RUN_DIR + "/host-marker"
OUTPUT_LIMIT = 1 << 20


def _marker():
    """A file on the host whose secret content tells whether a process can see the host's files."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    if not os.path.exists(MARKER):
        fd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
    return MARKER


def _launch(spec, mode, stdin, stdout, stderr, timeout=None, input=None, owner=None):
    ctx = host_context(_marker()) if spec.look else {"ns": inodes(), "hostname": "", "kernel": "", "links": []}
    ctx["owner"] = owner or "run-" + secrets.token_hex(4)
    if spec.cgroup:
        ctx["cgroup_procs"] = cgroups.procs_files(spec.cgroup)
        ctx["cgroup_home"] = cgroups.home_procs_files(ctx["cgroup_procs"])
    fd, report_path = tempfile.mkstemp(prefix="report-", suffix=".json", dir=private_dir(REPORTS_DIR))
    os.close(fd)
    args = [report_path, json.dumps(spec.to_dict()), json.dumps(ctx), mode]
    started = time.perf_counter()
    try:
        try:
            code, out, err = run_launcher(args, stdin, stdout, stderr, input=input, timeout=timeout)
        except CommandTimeout:
            _kill_leftover(report_path)
            if spec.network:
                network.disconnect(spec.network, ctx["owner"])
            raise CommandTimeout(f"the process {list(spec.argv)!r} did not finish within {timeout} s and was killed",
                                 fix="make it finish sooner, or start it with lab.spawn(...) and stop it yourself")
        duration = time.perf_counter() - started
        text = read_text(report_path)
        if not text:
            tail = (err or b"")[-400:].decode("utf-8", "replace") if isinstance(err, bytes) else ""
            raise MechanismError(f"the launcher exited with {code} without a report"
                                 + (f"; it said: {tail.strip()}" if tail.strip() else ""),
                                 fix="run `labkit doctor` on the target to see which mechanism is missing")
        report = json.loads(text)
    finally:
        try:
            os.unlink(report_path)
        except OSError:
            pass
    report["ctx"] = ctx
    if report.get("error"):
        raise from_wire(report["error"])
    return report, out, err, duration


def run_launcher(args, stdin, stdout, stderr, input=None, timeout=None):
    """Run the launcher with ``args``; streams as for subprocess (PIPE, DEVNULL or a file). Returns
    (exit code, stdout bytes or None, stderr bytes or None). Uses the warm fork server when it can
    (LABKIT_NO_FORKSERVER=1 turns it off), a fresh ``python3 -m labkit.agent.launch`` otherwise."""
    if os.environ.get("LABKIT_NO_FORKSERVER") != "1":
        try:
            return _via_forkserver(args, stdin, stdout, stderr, input, timeout)
        except (OSError, MechanismError):
            if os.environ.get("LABKIT_REQUIRE_FORKSERVER") == "1":
                raise
    proc = start_helper("launch", *args, stdin=stdin, stdout=stdout, stderr=stderr, cwd="/")
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise CommandTimeout(f"the launcher did not finish within {timeout} s") from None
    return proc.returncode, out, err


def _via_forkserver(args, stdin, stdout, stderr, input, timeout):
    import threading
    from . import forkserver
    mine, theirs, readers, results = [], [], {}, {}

    def fd_for(stream, writing):
        if stream is None or stream is subprocess.DEVNULL:
            fd = os.open(os.devnull, os.O_RDWR)
            theirs.append(fd)
            return fd
        if stream is subprocess.PIPE:
            r, w = os.pipe()
            child_end, our_end = (w, r) if writing else (r, w)
            theirs.append(child_end)
            mine.append(our_end)
            return child_end, our_end
        return stream.fileno() if hasattr(stream, "fileno") else stream

    fds = []
    pipes = {}
    for i, (stream, writing) in enumerate(((stdin, False), (stdout, True), (stderr, True))):
        got = fd_for(stream, writing)
        if isinstance(got, tuple):
            fds.append(got[0])
            pipes[i] = got[1]
        else:
            fds.append(got)
    try:
        child = forkserver.spawn(args, *fds)
    finally:
        for fd in theirs:
            os.close(fd)

    def drain(i, fd):
        chunks = []
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
        os.close(fd)
        results[i] = b"".join(chunks)

    for i in (1, 2):
        if i in pipes:
            readers[i] = threading.Thread(target=drain, args=(i, pipes[i]), daemon=True)
            readers[i].start()
    if 0 in pipes:
        try:
            if input:
                os.write(pipes[0], input)
        finally:
            os.close(pipes[0])
    try:
        code = child.wait(timeout)
    except TimeoutError:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait(30)
        for t in readers.values():
            t.join(5)
        raise CommandTimeout(f"the launcher did not finish within {timeout} s") from None
    for t in readers.values():
        t.join()
    return code, results.get(1), results.get(2)


def _kill_leftover(report_path):
    text = read_text(report_path)
    if text:
        try:
            rep = json.loads(text)
            undo_host_mounts(rep.get("host_mounts") or [])
        except ValueError:
            pass


def _record(spec, report, what, duration):
    rec = Recorder(what)
    rec.steps = report["steps"]
    rec.fact("pid", report.get("pid"))
    rec.fact("namespaces", list(spec.namespaces))
    rec.fact("ns", report.get("ns") or {})
    rec.fact("host_ns", report["ctx"]["ns"])
    rec.fact("shares_with_host", shares(report.get("ns"), report["ctx"]["ns"]))
    rec.fact("view", report.get("view"))
    rec.fact("host", {k: report["ctx"][k] for k in ("hostname", "kernel", "links")})
    if report.get("net"):
        rec.fact("net", report["net"])
    out = rec.to_dict(spec=spec.to_dict())
    out["duration"] = duration
    return out


def run(spec: ProcessSpec, timeout=60, input=None):
    """Run a process to completion; returns its record with exit code, stdout and stderr."""
    report, out, err, duration = _launch(spec, "run", subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                         subprocess.PIPE, subprocess.PIPE, timeout=timeout,
                                         input=input.encode() if input is not None else None)
    res = _record(spec, report, f"run {list(spec.argv) or spec.action} in namespaces {list(spec.namespaces)}", duration)
    res["exit_code"] = report.get("exit_code")
    res["stdout"] = out[:OUTPUT_LIMIT].decode("utf-8", "replace")
    res["stderr"] = err[:OUTPUT_LIMIT].decode("utf-8", "replace")
    return res


# --- processes that outlive the call -------------------------------------------------------------

def _entry_path(pid_id):
    check_name(pid_id, "process id")
    return f"{PROCS_DIR}/{pid_id}.json"


def _log_path(pid_id):
    check_name(pid_id, "process id")
    return f"{PROCS_DIR}/{pid_id}.log"


def start(spec: ProcessSpec, name=None):
    """Start a process that outlives the call (``exec`` or ``hold``), kept as entry ``name``; its record."""
    if spec.action not in ("exec", "hold"):
        raise InvalidSpec(f"a started process must exec or hold, not {spec.action!r}",
                          fix="use lab.run(...) for probes and escapes")
    private_dir(PROCS_DIR)
    pid_id = check_name(name, "process name") if name else "p" + secrets.token_hex(4)
    if os.path.exists(_entry_path(pid_id)) and is_alive(_load(pid_id)):
        raise Conflict(f"a process named {pid_id!r} is already running",
                          fix=f"stop it first (lab.process({pid_id!r}).stop()) or choose another name")
    log = _log_path(pid_id)
    with open(log, "wb") as logf:
        report, _, _, duration = _launch(spec, "start", subprocess.DEVNULL, logf, logf, owner=pid_id)
    entry = {"id": pid_id, **pid_fields(report["pid"]), **pid_fields(report.get("waiter"), "waiter"),
             "host_mounts": report.get("host_mounts") or [],
             "spec": spec.to_dict(), "log": log, "created": time.time(), "ns": report.get("ns"),
             "net": report.get("net")}
    write_json(_entry_path(pid_id), entry)
    res = _record(spec, report, f"start {list(spec.argv) or 'a holding process'} in namespaces "
                                f"{list(spec.namespaces)}", duration)
    res["id"] = pid_id
    return res


def _load(pid_id):
    entry = read_json(_entry_path(pid_id))
    if not isinstance(entry, dict) or not isinstance(entry.get("pid"), int):
        raise NotFound(f"no labkit process {pid_id!r}", fix="list them with lab.processes()")
    return entry


def is_alive(entry):
    return recorded_process(entry) is not None


def list_processes():
    out = []
    for _, e in read_dir(PROCS_DIR):
        if isinstance(e.get("pid"), int):
            e["alive"] = is_alive(e)
            out.append(e)
    return out


def inspect(pid_id):
    """The live state of a started process, read from /proc on the host."""
    e = _load(pid_id)
    e["alive"] = alive = is_alive(e)
    pid = e["pid"]
    if alive:
        e["ns_now"] = inodes(pid)
        e["host_ns"] = inodes()  # the agent runs in the host's namespaces
        e["shares_with_host"] = shares(e["ns_now"], e["host_ns"])
        status = read_text(f"/proc/{pid}/status") or ""
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                e["nspid"] = [int(x) for x in line.split()[1:]]
        e["uid_map"] = " ".join((read_text(f"/proc/{pid}/uid_map") or "").split())
        e["root"] = os.readlink(f"/proc/{pid}/root") if os.path.exists(f"/proc/{pid}/root") else None
        e["cmdline"] = (read_text(f"/proc/{pid}/cmdline") or "").split("\0")[:-1]
    return e


def exec_in(pid_id, argv, timeout=30):
    """Run argv inside a started process's namespaces and root: through :mod:`labkit.agent.enter` (its cgroup and
    capabilities too) for a process of the host's root, with nsenter(1) inside a user namespace."""
    if isinstance(argv, str) or not argv:
        raise InvalidSpec(f"argv must be a non-empty list, got {argv!r}", fix="e.g. ['hostname']")
    e = _load(pid_id)
    if not is_alive(e):
        raise NotFound(f"process {pid_id!r} is not running", fix="start it again with lab.spawn(...)")
    if "user" not in e["spec"]["namespaces"]:
        # root on the host's side: enter as `docker exec` does, with the process's capabilities and cgroup,
        # from the sealed interpreter (nsenter keeps every capability, and its binary would be the host's)
        spec = {"pid": e["pid"], "namespaces": [n for n in enter.ORDER if n in e["spec"]["namespaces"]],
                "procs": cgroups.procs_files(e["spec"]["cgroup"]) if e["spec"].get("cgroup") else [],
                "cwd": e["spec"].get("cwd") or "/", "env": {"PATH": CONTAINER_PATH},
                "argv": [str(a) for a in argv], "cap_keep": e["spec"].get("cap_keep")}
        rec = Recorder(f"exec {list(argv)} in {pid_id}")
        res = enter.run_entered(spec, rec, timeout)
        return rec.to_dict(exit_code=res.exit_code, stdout=res.stdout, stderr=res.stderr)
    nsargs = {"user": "--user", "mnt": "--mount", "uts": "--uts", "ipc": "--ipc", "net": "--net",
              "pid": "--pid", "cgroup": "--cgroup"}
    flags = [nsargs[n] for n in NAMESPACES if n in e["spec"]["namespaces"]]
    cmd = ["nsenter", "--target", str(e["pid"])] + flags
    if e["spec"].get("rootfs"):
        cmd += ["--root", "--wd"]
    cmd += ["--"] + [str(a) for a in argv]
    rec = Recorder(f"exec {list(argv)} in {pid_id}")
    res = run_cmd(cmd, recorder=rec, check=False, timeout=timeout,
                  env={"PATH": CONTAINER_PATH})
    out = rec.to_dict(exit_code=res.exit_code, stdout=res.stdout, stderr=res.stderr)
    return out


def stop(pid_id, timeout=None):
    """SIGTERM, then SIGKILL after ``timeout`` seconds; undo host mounts and network; remove the entry.

    Default timeout: 5 s, but 0 for a holding process (a bare `sleep` as PID 1 of its namespace ignores
    SIGTERM, as every PID 1 without a handler does; there is nothing to shut down gracefully)."""
    e = _load(pid_id)
    if timeout is None:
        timeout = 0 if e["spec"].get("action") == "hold" else 5.0
    rec = Recorder(f"stop {pid_id}")
    if is_alive(e):
        if timeout > 0:
            rec.kill(e["pid"], signal.SIGTERM)
        if not _wait_gone(e, timeout):
            rec.kill(e["pid"], signal.SIGKILL)
            _wait_gone(e, 5)
    rec.steps += undo_host_mounts(e.get("host_mounts") or [])
    if e.get("net"):
        rec.steps += network.disconnect(e["net"]["network"], pid_id)["steps"]
    wait_gone(e.get("waiter"), e.get("waiter_starttime"), 2)
    try:
        os.unlink(_entry_path(pid_id))
    except OSError:
        pass
    rec.fact("stopped", not is_alive(e))
    log = read_text(_log_path(pid_id), "")  # by rule, never a path read from the entry
    try:
        os.unlink(_log_path(pid_id))
    except OSError:
        pass
    return rec.to_dict(id=pid_id, log=log[-OUTPUT_LIMIT:])


def _wait_gone(entry, timeout):
    return wait_gone(entry.get("pid"), entry.get("starttime"), timeout)
