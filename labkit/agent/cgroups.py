"""cgroups: one interface over v2, v1 and hybrid hosts for limits, membership and readouts.

Detection reads /proc/self/mountinfo and the cgroup files; nothing is assumed. A labkit cgroup is a
directory below a ``labkit`` parent (:data:`PARENT`) in every hierarchy that holds a controller it
needs: one directory on pure v2, one per controller hierarchy on v1 and hybrid (whose v2 mount has
no controllers to offer). On v2 labkit respects the no-internal-processes rule (its parent holds no
process before ``cgroup.subtree_control`` is written) and enables controllers only for its own
subtree. Every file written is recorded; ``labkit cleanup`` removes whatever is left below the parent.
Standard library only.
"""
import os
import signal
import time

from ..wire.errors import Conflict, MechanismError, NotFound
from ..wire.specs import CgroupSpec, check_name
from . import devices
from .runner import Recorder, read_text

#: controllers labkit uses, by the name of their v1 hierarchy (on v2 the device controller is a BPF program and
#: the freezer is every group's own cgroup.freeze)
CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "cpuset", "devices", "freezer")

PARENT = "labkit"


def hierarchies(mountinfo=None, read=read_text):
    """[(mount point, fstype, [controllers])] for every cgroup mount of this mount namespace.

    ``mountinfo`` (text) and ``read`` (path -> text) default to the live system; tests pass other hosts'.
    """
    out = []
    text = mountinfo if mountinfo is not None else read_text("/proc/self/mountinfo")
    for line in (text or "").splitlines():
        pre, _, post = line.partition(" - ")
        fields, post = pre.split(), post.split()
        if not post or post[0] not in ("cgroup", "cgroup2"):
            continue
        mp = fields[4]
        if post[0] == "cgroup2":
            ctrls = (read(os.path.join(mp, "cgroup.controllers")) or "").split()
        else:
            opts = post[2].split(",") if len(post) > 2 else []
            ctrls = [o for o in opts if o not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec",
                                                  "clone_children", "nsdelegate", "memory_recursiveprot")
                     and not o.startswith("release_agent") and not o.startswith("name=")]
            ctrls += [o for o in opts if o.startswith("name=")]
        out.append((mp, post[0], ctrls))
    return out


def detect(mountinfo=None, read=read_text):
    """{'mode': 'v2'|'v1'|'hybrid'|'none', 'v2_mount', 'v2_controllers', 'v1': {controller: mount}}."""
    v1, v2_mount, v2_ctrls = {}, None, []
    for mp, fstype, ctrls in hierarchies(mountinfo, read):
        if fstype == "cgroup2":
            if v2_mount is None or mp == "/sys/fs/cgroup":
                v2_mount, v2_ctrls = mp, ctrls
        else:
            for c in ctrls:
                v1.setdefault(c, mp)
    real_v1 = {c: m for c, m in v1.items() if not c.startswith("name=")}
    if v2_mount and not real_v1:
        mode = "v2"
    elif v2_mount and real_v1:
        mode = "hybrid"
    elif real_v1:
        mode = "v1"
    else:
        mode = "none"
    return {"mode": mode, "v2_mount": v2_mount, "v2_controllers": v2_ctrls, "v1": v1}


def labkit_groups():
    """Every directory below a ``labkit`` parent in every hierarchy, deepest first."""
    roots = set()
    for mp, _, _ in hierarchies():
        roots.add(os.path.join(mp, PARENT))
    found = []
    for r in sorted(roots):
        if not os.path.isdir(r):
            continue
        for dirpath, dirnames, _ in os.walk(r):
            for d in dirnames:
                found.append(os.path.join(dirpath, d))
    return sorted(found, key=lambda p: -p.count("/")), sorted(r for r in roots if os.path.isdir(r))


# --- a labkit cgroup -----------------------------------------------------------------------------

class Layout:
    """Where the files of one labkit cgroup live on this host: {controller: directory}."""

    def __init__(self, name, info=None):
        self.name = check_name(name, "cgroup name")
        self.info = info or detect()
        self.mode = self.info["mode"]
        if self.mode == "none":
            raise MechanismError("this host has no cgroup filesystem mounted",
                                 fix="mount cgroup2 on /sys/fs/cgroup: `mount -t cgroup2 none /sys/fs/cgroup`")
        self.v2 = self.mode == "v2"
        if self.v2:
            base = os.path.join(self.info["v2_mount"], PARENT)
            self.parent_dirs = {"v2": base}
            self.dirs = {c: os.path.join(base, name) for c in CONTROLLERS}
        else:
            self.parent_dirs, self.dirs = {}, {}
            for c in CONTROLLERS:
                mp = self.info["v1"].get(c)
                if mp:
                    self.parent_dirs[mp] = os.path.join(mp, PARENT)
                    self.dirs[c] = os.path.join(mp, PARENT, name)

    def all_dirs(self):
        return sorted(set(self.dirs.values()))

    def path(self, controller, filename):
        d = self.dirs.get(controller)
        return None if d is None else os.path.join(d, filename)


def _write(path, value, rec):
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as exc:
        rec.file("write", path, f"{value!r} -> failed: {exc.strerror}")
        raise MechanismError(f"writing {value!r} to {path} failed: {exc.strerror}",
                             fix=_fix_for(path, exc)) from None
    rec.file("write", path, repr(str(value)))


def _fix_for(path, exc):
    if path.endswith("subtree_control"):
        return ("the parent still holds processes (cgroup v2's no-internal-processes rule) or the "
                "controller is not enabled above it; see `labkit doctor`")
    if path.endswith("cgroup.procs"):
        return "the process may have exited already, or the group lacks cpuset.cpus/cpuset.mems (v1)"
    return "see `labkit doctor` for the controllers this host offers"


def _v2_enable(parent_of_parent, parent, controllers, rec):
    """Enable controllers for labkit's subtree: in the root's and in labkit's own subtree_control."""
    avail = (read_text(os.path.join(parent_of_parent, "cgroup.controllers")) or "").split()
    want = [c for c in controllers if c in avail]
    on = (read_text(os.path.join(parent_of_parent, "cgroup.subtree_control")) or "").split()
    missing = [c for c in want if c not in on]
    if missing:
        _write(os.path.join(parent_of_parent, "cgroup.subtree_control"), " ".join("+" + c for c in missing), rec)
    # no internal processes: labkit's parent must be empty before it delegates to its children
    stray = (read_text(os.path.join(parent, "cgroup.procs")) or "").split()
    for pid in stray:
        _write(os.path.join(parent_of_parent, "cgroup.procs"), pid, rec)
    on = (read_text(os.path.join(parent, "cgroup.subtree_control")) or "").split()
    missing = [c for c in want if c not in on]
    if missing:
        _write(os.path.join(parent, "cgroup.subtree_control"), " ".join("+" + c for c in missing), rec)
    return want


def create(spec: CgroupSpec):
    """Make the cgroup and write its limits; returns a record with every file written."""
    lay = Layout(spec.name)
    rec = Recorder(f"create cgroup {spec.name!r} ({lay.mode})")
    rec.fact("mode", lay.mode)
    if lay.v2:
        parent = lay.parent_dirs["v2"]
        if not os.path.isdir(parent):
            os.mkdir(parent)
            rec.file("mkdir", parent)
        enabled = _v2_enable(lay.info["v2_mount"], parent, ("memory", "cpu", "pids", "cpuset"), rec)
        rec.fact("controllers", enabled)
    else:
        for mp, parent in lay.parent_dirs.items():
            if not os.path.isdir(parent):
                os.mkdir(parent)
                rec.file("mkdir", parent)
                if os.path.exists(os.path.join(parent, "cpuset.cpus")):
                    _inherit_cpuset(parent, rec)
        rec.fact("controllers", sorted(lay.dirs))
    for d in lay.all_dirs():
        if os.path.isdir(d):
            raise Conflict(f"a labkit cgroup named {spec.name!r} exists already ({d})",
                              fix="remove it first (lab.cgroup(...).remove(), or `labkit cleanup`) or choose another name")
    made = []
    try:
        for d in lay.all_dirs():
            os.mkdir(d)
            made.append(d)
            rec.file("mkdir", d)
        if not lay.v2 and "cpuset" in lay.dirs:
            _inherit_cpuset(lay.dirs["cpuset"], rec)
        _apply_limits(lay, spec, rec)
        if spec.devices:
            _restrict_devices(lay, spec, rec)
    except BaseException:
        for d in reversed(made):
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
    rec.fact("dirs", lay.all_dirs())
    return rec.to_dict(name=spec.name, mode=lay.mode, spec=spec.to_dict())


def _restrict_devices(lay, spec, rec):
    """Docker's device allow-list: devices.deny/allow on v1, a BPF device program on v2. Where the kernel
    offers neither, the record says so (nodev mounts still keep a container from host devices)."""
    allow = devices.POLICIES[spec.devices]
    if lay.v2:
        try:
            n = devices.attach_v2(lay.dirs["devices"], allow)
        except MechanismError as exc:
            rec.fact("devices", f"not enforced: {exc.message}")
            return
        rec.syscall("bpf", ["BPF_PROG_ATTACH", lay.dirs["devices"], "BPF_CGROUP_DEVICE"])
        rec.fact("devices", f"{spec.devices} allow-list: a BPF device program of {n} instructions")
    elif "devices" in lay.dirs:
        _write(lay.path("devices", "devices.deny"), "a", rec)
        for line in devices.v1_lines(allow):
            _write(lay.path("devices", "devices.allow"), line, rec)
        rec.fact("devices", f"{spec.devices} allow-list in {lay.dirs['devices']}")
    else:
        rec.fact("devices", "not enforced: this host mounts no devices hierarchy")


def _inherit_cpuset(d, rec):
    """v1 cpuset groups start empty: a process cannot join until cpus and mems are copied from the parent."""
    up = os.path.dirname(d)
    for f in ("cpuset.cpus", "cpuset.mems"):
        if not (read_text(os.path.join(d, f)) or "").strip():
            _write(os.path.join(d, f), (read_text(os.path.join(up, f)) or "").strip(), rec)


def _apply_limits(lay, spec, rec):
    p = lay.path
    if lay.v2:
        if spec.memory is not None:
            _write(p("memory", "memory.max"), spec.memory, rec)
        if spec.swap is not None and os.path.exists(p("memory", "memory.swap.max")):
            _write(p("memory", "memory.swap.max"), spec.swap, rec)
        if spec.cpus is not None:
            _write(p("cpu", "cpu.max"), f"{spec.quota_us} {spec.period_us}", rec)
        if spec.cpu_weight is not None:
            _write(p("cpu", "cpu.weight"), spec.cpu_weight, rec)
        if spec.pids is not None:
            _write(p("pids", "pids.max"), spec.pids, rec)
        if spec.cpuset is not None:
            _write(p("cpuset", "cpuset.cpus"), spec.cpuset, rec)
        return
    if spec.memory is not None:
        _need(lay, "memory")
        _write(p("memory", "memory.limit_in_bytes"), spec.memory, rec)
        memsw = p("memory", "memory.memsw.limit_in_bytes")
        if spec.swap is not None and os.path.exists(memsw):
            _write(memsw, spec.memory + spec.swap, rec)
    if spec.cpus is not None:
        _need(lay, "cpu")
        _write(p("cpu", "cpu.cfs_period_us"), spec.period_us, rec)
        _write(p("cpu", "cpu.cfs_quota_us"), spec.quota_us, rec)
    if spec.cpu_weight is not None:
        _need(lay, "cpu")
        _write(p("cpu", "cpu.shares"), max(2, spec.cpu_weight * 1024 // 100), rec)
    if spec.pids is not None:
        _need(lay, "pids")
        _write(p("pids", "pids.max"), spec.pids, rec)
    if spec.cpuset is not None:
        _need(lay, "cpuset")
        _write(p("cpuset", "cpuset.cpus"), spec.cpuset, rec)


def _need(lay, controller):
    if controller not in lay.dirs:
        raise MechanismError(f"this host ({lay.mode}) has no {controller} controller",
                             fix="see `labkit doctor`; the lab VM has every controller")


def _existing(name):
    lay = Layout(name)
    dirs = [d for d in lay.all_dirs() if os.path.isdir(d)]
    if not dirs:
        raise NotFound(f"there is no labkit cgroup {name!r}", fix=f"create it first: lab.cgroup({name!r}, ...)")
    return lay


def procs_files(name):
    """The cgroup.procs files a process writes its PID into to join the group (one per hierarchy)."""
    return [os.path.join(d, "cgroup.procs") for d in _existing(name).all_dirs()]


def home_procs_files(procs_files_):
    """For each hierarchy of ``procs_files_``, the cgroup.procs of the group the caller is in now."""
    mine = {}
    for line in (read_text("/proc/self/cgroup") or "").splitlines():
        num, ctrls, path = line.split(":", 2)
        mine[ctrls] = path
    out = []
    for mp, fstype, ctrls in hierarchies():
        if not any(f.startswith(mp.rstrip("/") + "/") for f in procs_files_):
            continue
        key = "" if fstype == "cgroup2" else ",".join(c for c in ctrls)
        path = mine.get(key)
        if path is None:  # v1 lines list controllers in the kernel's order; match by set
            path = next((p for k, p in mine.items() if k and set(k.split(",")) == set(ctrls)), None)
        if path is not None:
            out.append(os.path.join(mp, path.lstrip("/"), "cgroup.procs"))
    return out


def _tree(d):
    """``d`` and every group below it (a sandbox's agent makes its own), deepest first."""
    out = [d]
    for dirpath, dirnames, _ in os.walk(d):
        out += [os.path.join(dirpath, n) for n in dirnames]
    return sorted(out, key=lambda p: -p.count("/"))


def pids(name, lay=None):
    """Every process in the group, also in groups below it."""
    lay = lay or _existing(name)
    out = set()
    for top in lay.all_dirs():
        for d in _tree(top):
            out.update(int(p) for p in (read_text(os.path.join(d, "cgroup.procs")) or "").split())
    return sorted(out)


def _kv(text):
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _int(path):
    text = read_text(path) if path else None
    if text is None:
        return None
    text = text.strip()
    return None if text in ("", "max") else int(text)


def stats(name):
    """The kernel's own counters: memory now/peak, OOM kills, CPU time and throttling, pids."""
    lay = _existing(name)
    p = lay.path
    s = {"name": name, "mode": lay.mode, "time": time.time()}
    if lay.v2:
        s["memory_current"] = _int(p("memory", "memory.current"))
        s["memory_peak"] = _int(p("memory", "memory.peak"))
        s["memory_max"] = _int(p("memory", "memory.max"))
        s["oom_kills"] = _kv(read_text(p("memory", "memory.events"))).get("oom_kill")
        cpu = _kv(read_text(p("cpu", "cpu.stat")))
        s["cpu_usage_us"] = cpu.get("usage_usec")
        s["nr_periods"], s["nr_throttled"] = cpu.get("nr_periods"), cpu.get("nr_throttled")
        s["throttled_us"] = cpu.get("throttled_usec")
        q = (read_text(p("cpu", "cpu.max")) or "max").split()
        s["cpu_quota"] = None if q[0] == "max" else int(q[0]) / int(q[1])
    else:
        s["memory_current"] = _int(p("memory", "memory.usage_in_bytes"))
        s["memory_peak"] = _int(p("memory", "memory.max_usage_in_bytes"))
        s["memory_max"] = _int(p("memory", "memory.limit_in_bytes"))
        s["oom_kills"] = _kv(read_text(p("memory", "memory.oom_control"))).get("oom_kill")
        usage_ns = _int(p("cpuacct", "cpuacct.usage"))
        s["cpu_usage_us"] = None if usage_ns is None else usage_ns // 1000
        cpu = _kv(read_text(p("cpu", "cpu.stat")))
        s["nr_periods"], s["nr_throttled"] = cpu.get("nr_periods"), cpu.get("nr_throttled")
        t = cpu.get("throttled_time")
        s["throttled_us"] = None if t is None else t // 1000
        quota, period = _int(p("cpu", "cpu.cfs_quota_us")), _int(p("cpu", "cpu.cfs_period_us"))
        s["cpu_quota"] = None if quota in (None, -1) or not period else quota / period
    s["pids_current"] = _int(p("pids", "pids.current"))
    s["pids_max"] = _int(p("pids", "pids.max"))
    s["pids_refused"] = _kv(read_text(p("pids", "pids.events"))).get("max")  # forks the limit refused
    s["procs"] = pids(name)
    return s


def sample(name, seconds=3.0, interval=0.25):
    """stats() every ``interval`` seconds for ``seconds``: a time series measured on the target."""
    seconds, interval = min(float(seconds), 120.0), max(float(interval), 0.02)
    out, end = [], time.monotonic() + seconds
    while True:
        out.append(stats(name))
        if time.monotonic() >= end:
            return out
        time.sleep(interval)


def freeze(name, frozen=True, rec=None, timeout=5):
    """Stop every process of the group, also in groups below it, at once, where it stands (``frozen``), or let
    them all go on: v2's ``cgroup.freeze``, v1's ``freezer.state``. A frozen machine: its processes are there
    and answer nothing. Returns the record; waits until the kernel says the whole group is (un)frozen."""
    rec = rec or Recorder(f"{'freeze' if frozen else 'thaw'} cgroup {name!r}")
    lay = _existing(name)
    if lay.v2:
        d = lay.all_dirs()[0]
        _write(os.path.join(d, "cgroup.freeze"), 1 if frozen else 0, rec)
        done = lambda: f"frozen {int(frozen)}" in (read_text(os.path.join(d, "cgroup.events")) or "").splitlines()
    else:
        _need(lay, "freezer")
        state = lay.path("freezer", "freezer.state")
        _write(state, "FROZEN" if frozen else "THAWED", rec)
        done = lambda: (read_text(state) or "").strip() == ("FROZEN" if frozen else "THAWED")
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise MechanismError(f"cgroup {name!r} did not {'freeze' if frozen else 'thaw'} within {timeout} s",
                                 fix="a process in it may be in an uninterruptible sleep (D state); try again")
        time.sleep(0.005)
    rec.fact("frozen", frozen)
    return rec


def is_frozen(name, lay=None):
    lay = lay or _existing(name)
    if lay.v2:
        return "frozen 1" in (read_text(os.path.join(lay.all_dirs()[0], "cgroup.events")) or "").splitlines()
    state = lay.path("freezer", "freezer.state")
    return bool(state) and (read_text(state) or "").strip() != "THAWED"


def kill(name, rec=None, lay=None):
    """SIGKILL every process in the group until it is empty (the freezer-free way that works on v1 too; a
    frozen group is thawed after the signals, so that its processes can act on them and die). ``lay``: its
    :class:`Layout`, when the caller has it."""
    rec = rec or Recorder(f"kill cgroup {name!r}")
    lay = lay or _existing(name)
    frozen = is_frozen(name, lay)
    kill_file = os.path.join(lay.dirs.get("pids", lay.all_dirs()[0]), "cgroup.kill")
    if lay.v2 and os.path.exists(kill_file):
        _write(kill_file, 1, rec)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = pids(name, lay)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if frozen:
            freeze(name, False, rec)
            frozen = False
        time.sleep(0.02)
    rec.fact("empty", not pids(name, lay))
    return rec


def remove(name):
    """Kill what is inside, then remove the group's directories (deepest first)."""
    rec = Recorder(f"remove cgroup {name!r}")
    try:
        lay = _existing(name)
    except NotFound:
        return rec.to_dict(removed=False)
    kill(name, rec, lay)
    for d in [t for top in lay.all_dirs() for t in _tree(top)]:
        for _ in range(100):
            try:
                os.rmdir(d)
                rec.file("rmdir", d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)  # the last exiting task may still be leaving
        else:
            raise MechanismError(f"could not remove {d}", fix="run `labkit cleanup`")
    return rec.to_dict(removed=True)


def list_groups():
    seen = set()
    for g in labkit_groups()[0]:
        seen.add(os.path.basename(g))
    return sorted(seen)
