"""The isolation matrix: which configurations of namespaces and roots hide which parts of the host.

Each configuration starts a probe process that looks around from inside (its own view, reported by
the launcher before it would exec) and compares what it sees with the host's: PIDs, hostname,
mounts, network links, users, files. The result is a pandas DataFrame (1 = it sees the host's,
0 = it has its own or nothing) plus the reasons, ready for :func:`labkit.plotting.isolation_heatmap`.
"""
COLUMNS = {
    "host PIDs": "host_pids_visible",
    "hostname": "hostname_is_host",
    "mounts": "host_mounts_visible",
    "links": "host_links_visible",
    "users": "root_is_host_root",
    "files": "host_files_visible",
}


def default_configs(rootfs="demo"):
    """(label, options for Lab.probe) in teaching order: nothing, chroot, each namespace, a container."""
    return [
        ("plain process", {}),
        ("chroot", {"rootfs": rootfs}),
        ("uts", {"namespaces": ["uts"], "hostname": "lk-uts"}),
        ("pid (host /proc)", {"namespaces": ["pid"]}),
        ("pid + mnt (own /proc)", {"namespaces": ["pid", "mnt"]}),
        ("mnt", {"namespaces": ["mnt"]}),
        ("ipc", {"namespaces": ["ipc"]}),
        ("net", {"namespaces": ["net"]}),
        ("user", {"namespaces": ["user"]}),
        ("cgroup", {"namespaces": ["cgroup"]}),
        ("container (all + pivot_root)", {"namespaces": "all", "hostname": "box", "rootfs": rootfs,
                                          "root_mode": "pivot_root"}),
    ]


def reason(view, key):
    v = view.get(key)
    if key == "host_pids_visible":
        if v is None:
            return "no /proc inside: ps shows nothing (hidden, not isolated)"
        return "its /proc lists the host's processes" if v else f"its /proc shows {view.get('pids_visible')} PID(s), its own"
    if key == "hostname_is_host":
        return f"hostname {view.get('hostname')!r}"
    if key == "host_mounts_visible":
        if v is None:
            return "no /proc: mount table not readable"
        return "same mount table as the host" if v else f"none of the host's mounts ({view.get('mounts')} mounts of its own)"
    if key == "host_links_visible":
        return "links: " + ", ".join(view.get("links") or [])
    if key == "root_is_host_root":
        if v is None:
            return "no /proc: uid_map not readable"
        return f"uid_map {view.get('uid_map')!r}" + (" (root is the host's root)" if v else " (root is not the host's root)")
    if key == "host_files_visible":
        return "reads a file the host just wrote" if v else "cannot see the host's files"
    return str(v)


def isolation_matrix(lab, configs=None, rootfs="demo"):
    """Probe every configuration on ``lab``; returns (DataFrame of 0/1, DataFrame of reasons, records)."""
    import pandas as pd
    configs = configs or default_configs(rootfs)
    rows, why, records = {}, {}, {}
    for label, opts in configs:
        rec = lab.probe(**opts)
        view = rec.facts["view"]
        records[label] = rec
        rows[label] = {col: int(bool(view.get(key))) for col, key in COLUMNS.items()}
        why[label] = {col: reason(view, key) for col, key in COLUMNS.items()}
    matrix = pd.DataFrame.from_dict(rows, orient="index")[list(COLUMNS)]
    reasons = pd.DataFrame.from_dict(why, orient="index")[list(COLUMNS)]
    return IsolationResult(matrix, reasons, records)


class IsolationResult:
    def __init__(self, matrix, reasons, records):
        self.matrix, self.reasons, self.records = matrix, reasons, records

    def chart(self, subtitle=""):
        from .plotting import isolation_heatmap
        return isolation_heatmap(self.matrix, subtitle=subtitle)

    def _repr_html_(self):
        return self.matrix.replace({1: "host's", 0: "own"})._repr_html_()

    def __repr__(self):
        return repr(self.matrix)
