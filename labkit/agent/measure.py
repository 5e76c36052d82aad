"""Overhead benchmarks, the target's side: one sample of one measurement in one case, timed on the target.

The host side (:mod:`labkit.course.bench`) plans, interleaves and repeats; every call here takes one sample
and returns it, so the client can show progress and nothing here runs for long. The cases:

- ``native``: the host's static busybox as a plain process;
- ``container``: the same script exec'd into a running labkit container (its image's busybox);
- ``vm``: the same script in the VM's guest (:mod:`labkit.agent.vm`), over its serial console.

Workloads time themselves from inside (``BENCH_SH``); start-up is timed here around the whole start;
network peers are busybox ``nc`` listeners inside each case and a client here, on the host. Owns:
the bundle directory of a start-up rig (removed by ``startup_finish``) and the listeners it starts
(they end with their one connection). Standard library only.
"""
import ipaddress
import json
import os
import platform
import secrets
import shlex
import shutil
import socket
import subprocess
import time

from ..wire.errors import CommandTimeout, Conflict, InvalidSpec, MechanismError
from ..wire.specs import RUN_DIR, STATE_DIR, CgroupSpec, ProcessSpec, check_port
from . import cgroups, engine, oci, process, roots, rootfs, supervisor, vm, workloads
from .runner import read_text, run, start, which

BENCH_DIR = STATE_DIR + "/bench"      # native file I/O: the same disk as the containers' upper dirs
RIGS = RUN_DIR + "/bench"
START_NS = ("pid", "mnt", "uts", "ipc", "net")


def environment():
    """What the figures depend on: kernel, CPU, memory, cgroup layout, qemu and how the VM is accelerated."""
    cpu = ""
    for line in (read_text("/proc/cpuinfo") or "").splitlines():
        if line.lower().startswith(("model name", "cpu model", "processor\t: arm")) and ":" in line:
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next((int(x.split()[1]) for x in (read_text("/proc/meminfo") or "").splitlines()
                if x.startswith("MemTotal:")), None)
    qemu = vm.QEMU.get(platform.machine(), ("",))[0]
    qv = ""
    if qemu and which(qemu):
        qv = run([qemu, "--version"], check=False).stdout.splitlines()[:1]
        qv = qv[0] if qv else ""
    try:
        mode, reason = vm.accel()
    except MechanismError as exc:
        mode, reason = "none", exc.message
    bb = rootfs.busybox_or_fail()
    return {"kernel": os.uname().release, "machine": platform.machine(), "cpu": cpu or platform.processor(),
            "cores": os.cpu_count(), "mem_total_kb": mem, "cgroup_mode": cgroups.detect()["mode"],
            "qemu": qv, "vm_accel": mode, "vm_accel_reason": reason,
            "busybox": run([bb], check=False).stdout.splitlines()[:1] or [""],
            "crun": bool(which("crun")), "runc": bool(which("runc")), "time": time.time()}


def _check(workload, amount):
    if workload not in workloads.WORKLOADS:
        raise InvalidSpec(f"unknown workload {workload!r}", fix="one of " + ", ".join(workloads.WORKLOADS))
    if not isinstance(amount, int) or amount < 1:
        raise InvalidSpec(f"amount {amount!r} must be a positive whole number", fix="e.g. 1000")


def _one(text, workload, where):
    got = [s for s in workloads.parse_bench(text) if s["workload"] == workload]
    if not got:
        raise MechanismError(f"the {workload} workload printed no result {where}: {text.strip()[-300:]!r}",
                             fix="run `labkit doctor`; the script needs busybox's awk, dd and adjtimex")
    return got[0]


def native(workload, amount):
    _check(workload, amount)
    os.makedirs(BENCH_DIR, exist_ok=True)
    r = run([rootfs.busybox_or_fail(), "sh", "-c", workloads.BENCH_SH, "bench", workload, str(amount), BENCH_DIR],
            check=False, timeout=600)
    return _one(r.stdout + r.stderr, workload, "on the host")


def container(ref, workload, amount):
    _check(workload, amount)
    r = engine.exec_in(ref, ["/bin/busybox", "sh", "-c", workloads.BENCH_SH, "bench", workload, str(amount), "/"],
                       timeout=600)
    return _one(r["stdout"] + r["stderr"], workload, "in the container")


def in_vm(vm_id, workload, amount):
    _check(workload, amount)
    r = vm._live(vm_id).exec(f"sh /lk/bench.sh {workload} {amount} /mnt", timeout=900)
    return _one(r["stdout"], workload, "in the VM")


# -- network -----------------------------------------------------------------------------------------
def _listener(mode, port, busybox="/bin/busybox"):
    prog = [busybox, "dd", "of=/dev/null", "bs=65536"] if mode == "throughput" else [busybox, "cat"]
    return [busybox, "nc", "-l", "-p", str(port), "-e", *prog]


# runs its arguments in the background, detached from the exec's pipes: the arguments stay an argv list,
# never text a shell parses
_BACKGROUND = '"$@" </dev/null >/dev/null 2>&1 &'


def net_serve(case, mode, port, ref=None, vm_id=None):
    """Start a one-connection listener in ``case``: a sink for 'throughput', an echo for 'latency'."""
    if mode not in ("throughput", "latency"):
        raise InvalidSpec(f"network mode {mode!r}", fix="'throughput' or 'latency'")
    if case not in ("native", "container", "vm"):
        raise InvalidSpec(f"unknown case {case!r}", fix="native, container or vm")
    port = check_port(port)
    if case == "native":
        # its own session, no pipes: ends with its connection
        _wait_listening(start(_listener(mode, port, rootfs.busybox_or_fail())), port)
    elif case == "container":
        engine.exec_in(ref, ["/bin/busybox", "sh", "-c", _BACKGROUND, "sh", *_listener(mode, port)], timeout=30)
    else:
        # the VM's console takes one shell line: every word quoted (and the port is a checked int)
        vm._live(vm_id).exec(" ".join(shlex.quote(a) for a in _listener(mode, port)) +
                             " </dev/null >/dev/null 2>&1 &", timeout=60)
    return {"port": port}


def _listening(port):
    """Whether a TCP socket of this network namespace listens on ``port`` (any address, IPv4 or IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in (read_text(table) or "").splitlines()[1:]:
            f = line.split()
            if len(f) > 3 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _wait_listening(proc, port, seconds=5.0):
    """Return once the host's listener ``proc`` listens on ``port``. A port some other socket holds (a
    service, or a connection's own local port) makes nc exit at once: that is a Conflict the caller can
    answer with another port, never a client that waits on a refused port."""
    deadline = time.monotonic() + seconds
    while not _listening(port):
        if proc.poll() is not None:
            raise Conflict(f"port {port} is already taken on the host: the listener could not bind it",
                           fix="call bench.net_serve again with another port")
        if time.monotonic() > deadline:
            return  # still starting: the client's connect retries
        time.sleep(0.01)


def _connect(ip, port, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.create_connection((ip, port), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError as exc:
            if time.monotonic() > deadline:
                raise MechanismError(f"could not connect to the listener at {ip}:{port}: {exc}",
                                     fix="is the case's network up? see lab.topology()") from None
            time.sleep(0.02)


def net_measure(ip, port, mode, amount):
    """The client on the host: send ``amount`` MiB to a sink (until it has read all and closed), or make
    ``amount`` one-byte round trips to an echo. Returns elapsed seconds and what was moved."""
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
        raise InvalidSpec(f"amount {amount!r} must be a positive whole number", fix="e.g. 16")
    if mode not in ("throughput", "latency"):
        raise InvalidSpec(f"network mode {mode!r}", fix="'throughput' or 'latency'")
    try:
        ip = str(ipaddress.IPv4Address(ip))
    except (TypeError, ValueError):
        raise InvalidSpec(f"ip {ip!r} is not an IPv4 address", fix="the case's address, e.g. '127.0.0.1'") from None
    s = _connect(ip, check_port(port))
    try:
        s.settimeout(300)
        if mode == "throughput":
            chunk = b"\0" * 65536
            t = time.perf_counter()
            for _ in range(amount * 16):
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
            return {"elapsed_s": time.perf_counter() - t, "amount": amount, "unit": "MiB"}
        rtts = []
        for _ in range(amount):
            t = time.perf_counter()
            s.sendall(b"x")
            if not s.recv(1):
                raise MechanismError("the echo listener closed early", fix="run the measurement again")
            rtts.append(time.perf_counter() - t)
        rtts.sort()
        return {"elapsed_s": sum(rtts), "amount": amount, "unit": "round trips", "rtt_median_s": rtts[len(rtts) // 2],
                "rtt_min_s": rtts[0]}
    finally:
        s.close()


# -- start-up -------------------------------------------------------------------------------------------
def startup_prepare():
    """One busybox overlay root, one cgroup and one OCI bundle over that root, shared by every case
    (so the runtimes differ in nothing but themselves). crun on a hybrid host runs with the almost
    empty cgroup2 mount hidden in a private mount namespace: it refuses hybrid hosts otherwise."""
    rid = secrets.token_hex(4)
    rig = {"id": rid, "cid": f"bench-{rid}", "cgroup": f"bench-{rid}", "bundle": f"{RIGS}/{rid}", "notes": [],
           "runtimes": {}}
    os.makedirs(RIGS, exist_ok=True)
    with open(f"{RIGS}/{rid}.json", "w") as f:
        json.dump(rig, f)
    try:
        root = roots.create_container_root(ref="busybox", cid=rig["cid"])
        rig["root"] = root["merged"]
        cgroups.create(CgroupSpec(name=rig["cgroup"], pids=64))
        os.makedirs(rig["bundle"], exist_ok=True)
        with open(f"{rig['bundle']}/config.json", "w") as f:
            json.dump(oci.runtime_config(rig["root"], f"/labkit/bench-oci-{rid}"), f)
        mode = cgroups.detect()["mode"]
        for runtime in oci.RUNTIMES:
            cmd = oci.runtime_argv(runtime, "run", "--bundle", rig["bundle"])
            if cmd is None:
                rig["notes"].append(f"{runtime}: not installed (apt-get install {runtime})")
                continue
            if runtime == "crun" and mode == "hybrid":
                rig["notes"].append("crun: hybrid cgroups, run with the cgroup2 mount hidden in a private "
                                    "mount namespace")
            try:
                probe = run(cmd + [f"lkb-{rid}-probe"], check=False, timeout=60)
            except CommandTimeout:
                rig["notes"].append(f"{runtime}: unavailable here: a container did not finish within 60 s")
                continue
            if probe.exit_code != 0:
                rig["notes"].append(f"{runtime}: unavailable here: {probe.stderr.strip()[-200:]}")
                continue
            rig["runtimes"][runtime] = cmd
    except BaseException:
        startup_finish(rig)
        raise
    with open(f"{RIGS}/{rid}.json", "w") as f:
        json.dump(rig, f)
    return rig


def startup_sample(case, rig, accel_mode=None):
    """Seconds from asking to the first useful instruction having run (``/bin/true`` exited; for the VM:
    its /init printed its first line)."""
    t = time.perf_counter()
    if case == "process":
        subprocess.run(["/bin/true"], check=True)  # timed: not through the runner (see labkit.agent.runner)
    elif case == "unshare":
        subprocess.run(["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--net", "/bin/true"],
                       check=True)  # timed: not through the runner (see labkit.agent.runner)
    elif case == "labkit":
        spec = ProcessSpec(argv=("/bin/true",), namespaces=START_NS, rootfs=rig["root"], root_mode="pivot_root",
                           cgroup=rig["cgroup"], look=False)
        res = process.run(spec, timeout=60)
        if res.get("exit_code") != 0:
            raise MechanismError(f"labkit start failed: {res.get('stderr', '')[-200:]}", fix="run `labkit doctor`")
    elif case in rig["runtimes"]:
        subprocess.run(rig["runtimes"][case] + [f"lkb-{secrets.token_hex(4)}"], check=True,
                       capture_output=True)  # timed: not through the runner (see labkit.agent.runner)
    elif case == "vm":
        machine = vm.VM(accel_mode=accel_mode)
        try:
            machine.start()
            return {"elapsed_s": machine.rec.facts["boot_to_ready_s"], "to_up_s": machine.rec.facts["boot_to_up_s"],
                    "accel": machine.mode}
        finally:
            machine.stop()
    else:
        raise InvalidSpec(f"no start-up case {case!r} here",
                          fix="process, unshare, labkit, vm, and crun/runc where installed")
    return {"elapsed_s": time.perf_counter() - t}


def startup_finish(rig):
    if rig.get("root") or os.path.isdir(roots.container_dir(rig["cid"])):
        try:
            roots.drop_container_root(cid=rig["cid"])
        except Exception:  # noqa: BLE001 - keep undoing the rest
            pass
    try:
        cgroups.remove(rig["cgroup"])
    except Exception:  # noqa: BLE001
        pass
    for d in cgroups.labkit_groups()[0]:
        if d.endswith(f"/bench-oci-{rig['id']}"):
            try:
                os.rmdir(d)
            except OSError:
                pass
    shutil.rmtree(rig["bundle"], ignore_errors=True)
    try:
        os.unlink(f"{RIGS}/{rig['id']}.json")
    except FileNotFoundError:
        pass
    return {"removed": rig["id"]}


# -- idle memory footprint ------------------------------------------------------------------------------
def mem_available_kb():
    return next((int(x.split()[1]) for x in (read_text("/proc/meminfo") or "").splitlines()
                 if x.startswith("MemAvailable:")), None)


def container_footprint(ref):
    """PSS of the container's processes (its cgroup) plus its share of the supervisor's, KiB: what one more
    container costs, the way qemu's PSS is what one more VM costs. The supervisor is one Python process for
    all containers (a few MiB, shared out over those running); Docker keeps a containerd-shim per container."""
    cid = engine._resolve(ref)
    pids = cgroups.pids(engine._cg(cid))
    inside = sum(vm.pss_kb(p) or 0 for p in pids)
    holders = supervisor.holders(supervisor.identity())
    running = sum(1 for r in engine.ps()) or 1
    share = sum(vm.pss_kb(p) or 0 for p in holders) / running
    return {"pss_kb": inside + share, "processes_pss_kb": inside, "processes": len(pids),
            "supervisor_share_kb": share}


def vm_footprint(vm_id):
    machine = vm._live(vm_id)
    return {"pss_kb": vm.pss_kb(machine.proc.pid), "processes": 1}
