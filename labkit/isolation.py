"""The isolation matrix: which configurations hide which parts of the host, from a plain process to a VM.

One probe (:data:`labkit.agent.workloads.PROBE_SH`, a busybox shell script) runs unchanged in every
configuration -- a plain process, chroot, each namespace added in turn, a labkit container, the
container with a user namespace and Docker's default capabilities, and the VM -- and reports raw
facts; :func:`labkit.agent.workloads.compare` says what they mean next to the host's own facts.
The result is a pandas DataFrame (1 = it sees, shares or can reach the host's; 0 = its own, bounded
or nothing) plus the reasons, ready for :func:`labkit.plotting.isolation_heatmap`.
"""
from .agent.workloads import compare
from .specs import DOCKER_DEFAULT_CAPS

BASIC = ("host PIDs", "hostname", "mounts", "links", "users", "files")
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
    argv = [busybox, "sh", "-c", ctx["script"], "probe", ctx["marker"]]
    cg = None
    try:
        if limits:
            cg = lab.cgroup(f"iso-{abs(hash(label)) % 10 ** 8}", memory=limits["memory"], pids=limits["pids"])
            opts["cgroup"] = cg.name
        rec = lab.run_in(argv, opts.pop("namespaces", ()), look=False, **opts)
        if rec.exit_code != 0:
            from .errors import MechanismError
            raise MechanismError(f"the probe failed in configuration {label!r} (exit {rec.exit_code}): "
                                 f"{(rec.stderr or '').strip()[-300:]}", fix="run `labkit doctor`")
        from .agent.workloads import parse_probe
        facts = parse_probe(rec.stdout)
        real_limits = cg.limits() if cg else None
    finally:
        if cg:
            cg.remove()
    return facts, compare(facts, ctx["host"], limits=real_limits)


def probe_vm(lab, ctx, vm=None, accel=None):
    """The same probe as the VM's guest (a VM is booted for it unless one is given)."""
    from .agent.workloads import parse_probe
    own = vm is None
    vm = vm or lab.vm_start(accel=accel)
    try:
        res = vm.exec(f"sh /lk/probe.sh {ctx['marker']}")
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
