"""The isolation matrix: which configurations hide which parts of the host, from a plain process to a VM.

One probe (:data:`labkit.agent.workloads.PROBE_SH`, a busybox shell script) runs unchanged in every
configuration -- a plain process, chroot, each namespace added in turn, a labkit container, the
container with a user namespace and Docker's default capabilities, and the VM -- and reports raw
facts; :func:`compare` (here, on the client) says what they mean next to the host's own facts.
The result is a pandas DataFrame (1 = it sees, shares or can reach the host's; 0 = its own, bounded
or nothing) plus the reasons, ready for :func:`labkit.course.plotting.isolation_heatmap`.
"""
import re

from ..wire.arch import DOCKER_DEFAULT_CAPS

BASIC = ("host PIDs", "hostname", "mounts", "links", "users", "files", "IPC objects", "cgroup path")
ALL = BASIC + ("kernel", "mount (host)", "load module", "set clock", "write /proc/sys", "write /sys",
                "memory", "PIDs")
LIMITS = {"memory": "256M", "pids": 128}
USERNS_MAP = ((0, 100000, 65536),)


def default_configs(rootfs="demo"):
    """(label, options for Lab.run_in) in teaching order: nothing, chroot, each namespace, containers."""
    box = ["uts", "pid", "mnt", "ipc", "net", "cgroup"]
    return [
        ("plain process", {}),
        ("chroot", {"rootfs": rootfs}),
        ("uts", {"namespaces": ["uts"], "hostname": "lk-uts"}),
        ("pid (host /proc)", {"namespaces": ["pid"], "mount_proc": False}),
        ("pid + mnt (own /proc)", {"namespaces": ["pid", "mnt"]}),
        ("mnt", {"namespaces": ["mnt"]}),
        ("ipc", {"namespaces": ["ipc"]}),
        ("net", {"namespaces": ["net"]}),
        ("user", {"namespaces": ["user"]}),
        ("cgroup", {"namespaces": ["cgroup"]}),
        ("container", {"namespaces": box, "hostname": "box", "rootfs": rootfs, "root_mode": "pivot_root",
                       "limits": LIMITS}),
        ("container + userns, default caps", {"namespaces": box + ["user"], "hostname": "box", "rootfs": rootfs,
                                              "root_mode": "pivot_root", "id_map": USERNS_MAP,
                                              "cap_keep": DOCKER_DEFAULT_CAPS, "limits": LIMITS}),
    ]


def probe(lab, label, opts, ctx):
    """Run the probe in one configuration; returns (facts, {column: (0/1, reason)})."""
    opts = dict(opts)
    limits = opts.pop("limits", None)
    busybox = "/bin/busybox" if opts.get("rootfs") else ctx["busybox"]
    argv = [busybox, "sh", "-c", ctx["script"], "probe", ctx["marker"], str(ctx.get("shm_key") or "")]
    cg = None
    try:
        if limits:
            cg = lab.cgroup(f"iso-{abs(hash(label)) % 10 ** 8}", memory=limits["memory"], pids=limits["pids"])
            opts["cgroup"] = cg.name
        rec = lab.run_in(argv, opts.pop("namespaces", ()), look=False, **opts)
        if rec.exit_code != 0:
            from ..wire.errors import MechanismError
            raise MechanismError(f"the probe failed in configuration {label!r} (exit {rec.exit_code}): "
                                 f"{(rec.stderr or '').strip()[-300:]}", fix="run `labkit doctor`")
        facts = parse_probe(rec.stdout)
        real_limits = cg.limits() if cg else None
    finally:
        if cg:
            cg.remove()
    return facts, compare(facts, ctx["host"], limits=real_limits)


def probe_vm(lab, ctx, vm=None, accel=None):
    """The same probe as the VM's guest (a VM is booted for it unless one is given)."""
    own = vm is None
    vm = vm or lab.vm_start(accel=accel)
    try:
        res = vm.exec(f"sh /lk/probe.sh {ctx['marker']} {ctx.get('shm_key') or ''}")
    finally:
        if own:
            vm.stop()
    facts = parse_probe(res["stdout"])
    return facts, compare(facts, ctx["host"], vm=True), vm.accel


def isolation_matrix(lab, configs=None, rootfs="demo", columns=BASIC, vm=False, accel=None):
    """Probe every configuration on ``lab`` (and a VM when ``vm``); returns an :class:`IsolationResult`."""
    import pandas as pd
    configs = configs or default_configs(rootfs)
    ctx = lab.call("probe.context")
    rows, why, facts = {}, {}, {}
    try:
        for label, opts in configs:
            f, cmp = probe(lab, label, opts, ctx)
            facts[label] = f
            rows[label] = {c: cmp[c][0] for c in columns}
            why[label] = {c: cmp[c][1] for c in columns}
        if vm:
            f, cmp, mode = probe_vm(lab, ctx, accel=accel)
            label = f"VM ({mode.upper()})"
            facts[label] = f
            rows[label] = {c: cmp[c][0] for c in columns}
            why[label] = {c: cmp[c][1] for c in columns}
    finally:
        lab.call("probe.done", marker=ctx["marker"])
    matrix = pd.DataFrame.from_dict(rows, orient="index")[list(columns)]
    reasons = pd.DataFrame.from_dict(why, orient="index")[list(columns)]
    return IsolationResult(matrix, reasons, facts, ctx["host"])


class IsolationResult:
    def __init__(self, matrix, reasons, facts, host):
        self.matrix, self.reasons, self.facts, self.host = matrix, reasons, facts, host

    @property
    def records(self):  # the raw facts per configuration (older name)
        return self.facts

    def chart(self, subtitle=""):
        from .plotting import isolation_heatmap
        return isolation_heatmap(self.matrix, subtitle=subtitle)

    def _repr_html_(self):
        return self.matrix.replace({1: "host's", 0: "own"})._repr_html_()

    def __repr__(self):
        return repr(self.matrix)


# -- what a probe's facts mean -------------------------------------------------------------------
def parse_probe(text):
    """The probe's ``key=value`` lines as a dict (other lines ignored)."""
    facts = {}
    for line in (text or "").splitlines():
        key, sep, value = line.strip("\r").partition("=")
        if sep and re.fullmatch(r"[a-z_0-9]+", key):
            facts[key] = value.strip()
    return facts


CAP_NAMES = {21: "CAP_SYS_ADMIN", 16: "CAP_SYS_MODULE", 25: "CAP_SYS_TIME", 19: "CAP_SYS_PTRACE", 12: "CAP_NET_ADMIN"}


def compare(facts, host, limits=None, vm=False):
    """What a probe's facts mean: {column: (1 if it reaches or shares the host's, else 0, reason)}.

    ``limits``: the memory and pids limits of the cgroup the probe ran in (None: unlimited);
    ``vm``: the facts come from a guest kernel (its root is the guest's root, not the host's)."""
    limits = limits or {}
    proc = facts.get("proc") == "1"
    same_kernel = facts.get("boot_id") == host["boot_id"] if facts.get("boot_id") else facts.get("kernel") == host["kernel"]
    out = {}
    if not proc:
        out["host PIDs"] = (0, "no /proc inside: ps shows nothing (hidden, not isolated)")
    elif facts.get("pid1_start") == host["pid1_start"] and same_kernel:
        out["host PIDs"] = (1, f"its /proc lists the host's processes ({facts.get('pids')} PIDs, the host's PID 1)")
    else:
        out["host PIDs"] = (0, f"its /proc shows {facts.get('pids')} PID(s), its own")
    out["hostname"] = (int(facts.get("hostname") == host["hostname"]), f"hostname {facts.get('hostname')!r}")
    def shared_ns(name):
        # namespace inodes are only comparable within one kernel (every kernel's first ones are alike)
        value = facts.get(f"ns_{name}")
        return bool(value) and same_kernel and int(value) == host["ns"][name]

    ids = set((facts.get("mount_ids") or "").split())
    shared_mounts = shared_ns("mnt")
    if shared_mounts:
        out["mounts"] = (1, "the host's mount namespace" + ("" if ids & set(host["mount_ids"]) else
                                                            f" (it sees only the {len(ids)} mount(s) under its root)"))
    else:
        out["mounts"] = (0, f"{len(ids)} mounts of its own" if proc else "no /proc: mount table not readable")
    links = sorted((facts.get("links") or "").split())
    shared_links = shared_ns("net")
    out["links"] = (int(shared_links), "links: " + (", ".join(links) or "none visible")
                    + (" (the host's network namespace)" if shared_links else ""))
    uid_map = facts.get("uid_map", "")
    if vm:
        out["users"] = (0, f"uid {facts.get('uid')} is the guest kernel's root, not the host's")
    elif not proc:
        out["users"] = (int(facts.get("uid") == "0"), f"uid {facts.get('uid')}; no /proc: uid_map not readable")
    else:
        host_root = shared_ns("user") and facts.get("uid") == "0"
        out["users"] = (int(host_root), f"uid {facts.get('uid')}, uid_map {uid_map.rstrip(';')!r}"
                        + (" (the host's root)" if host_root else " (not the host's root)"))
    seen = bool(host.get("marker")) and facts.get("marker") == host["marker"]
    out["files"] = (int(seen), "reads a file the host just wrote" if seen else "cannot see the host's files")
    shm = facts.get("sees_shm")
    if shm is None:
        out["IPC objects"] = (0, "no System V IPC list to read (no /proc, or the host made no segment)")
    else:
        shm = shm == "1" and same_kernel
        out["IPC objects"] = (int(shm), f"/proc/sysvipc/shm lists the segment the host just made (key {host.get('shm_key')})"
                              if shm else "its System V IPC objects are its own: the host's segment is not there")
    cg_lines = [ln for ln in (facts.get("cgroup_self") or "").split(";") if ln]
    if not cg_lines:
        out["cgroup path"] = (0, "no /proc: /proc/self/cgroup not readable")
    else:
        shown = max(cg_lines, key=lambda ln: len(ln.split(":", 2)[-1]))  # the line with the deepest path
        shared = shared_ns("cgroup")
        out["cgroup path"] = (int(shared), f"/proc/self/cgroup: {shown}" + (
            " (the host's cgroup namespace: paths from the host's root)" if shared else
            " (the guest kernel's own cgroups)" if vm else " (paths from its own cgroup namespace's root)"))
    out["kernel"] = (int(same_kernel), f"kernel {facts.get('kernel')}, boot id {(facts.get('boot_id') or '?')[:8]}"
                     + (" (the host's kernel)" if same_kernel else " (a kernel of its own)"))
    can_mount = facts.get("can_mount") == "1"
    out["mount (host)"] = (int(can_mount and shared_mounts),
                           "mounted a tmpfs in the host's mount namespace" if can_mount and shared_mounts else
                           "mounted a tmpfs in a mount table of its own" if can_mount else
                           "no writable directory to try a mount on" if facts.get("can_mount") == "untested"
                           else "mount(2): not permitted")
    mod = facts.get("can_load_module")
    if mod == "nosys":
        try:
            has_cap = bool(int(facts.get("capeff", "0"), 16) >> 16 & 1) and shared_ns("user")
        except ValueError:
            has_cap = False
        out["load module"] = (int(has_cap and same_kernel), "this kernel has no module loading (init_module: ENOSYS); "
                              + ("it holds CAP_SYS_MODULE in the host's user namespace, so it could on a kernel "
                                 "that has it" if has_cap else "nor does it hold CAP_SYS_MODULE in the host's user namespace"))
    else:
        mod = mod == "1"
        out["load module"] = (int(mod and same_kernel),
                              "init_module passed the permission check: it could load code into the host's kernel"
                              if mod and same_kernel else "could load a module, into its own kernel only" if mod
                              else "init_module: not permitted")
    clock = facts.get("can_set_clock") == "1"
    out["set clock"] = (int(clock and same_kernel), "adjtimex(ADJ_TICK) allowed: it can set the host's clock"
                        if clock and same_kernel else "can set its own kernel's clock only" if clock
                        else "adjtimex: not permitted (no CAP_SYS_TIME in the host's user namespace)")
    for col, key, what, missing, refused in (
            ("write /proc/sys", "can_write_proc_sys", "a kernel setting in /proc/sys", "no /proc/sys to write to",
             "/proc/sys: permission denied (the setting belongs to the host's root)"),
            ("write /sys", "can_write_sys", "a kernel parameter in /sys", "no sysfs to write to, and it may not mount one",
             "/sys: read-only or permission denied")):
        w = facts.get(key)
        if w is None:
            out[col] = (0, missing)
        else:
            w = w == "1"
            out[col] = (int(w and same_kernel), f"wrote {what}: the host's kernel's" if w and same_kernel
                        else f"wrote {what} of its own kernel" if w else refused)
    mem_kb = facts.get("mem_total_kb")
    if vm:
        out["memory"] = (0, f"bounded by the VM's RAM ({int(mem_kb) // 1024 if mem_kb else '?'} MiB seen by its kernel)")
    elif limits.get("memory"):
        out["memory"] = (0, f"cgroup memory limit {limits['memory']} bytes")
    else:
        out["memory"] = (1, "no memory limit: it can take all of the host's memory")
    if vm:
        out["PIDs"] = (0, "the guest's processes are the guest's; the host sees one qemu process")
    elif limits.get("pids"):
        out["PIDs"] = (0, f"cgroup pids limit {limits['pids']}")
    else:
        out["PIDs"] = (1, "no pids limit: a fork bomb fills the host's process table")
    return out


def caps_text(capeff):
    """A CapEff hex mask as the names of a few capabilities that matter for escaping."""
    try:
        mask = int(capeff, 16)
    except (TypeError, ValueError):
        return "?"
    n = bin(mask).count("1")
    named = [name for bit, name in sorted(CAP_NAMES.items()) if mask >> bit & 1]
    return f"{n} capabilities" + (f" incl. {', '.join(named)}" if named else "")
