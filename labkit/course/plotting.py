"""The one place that owns labkit's chart style. Every chart in the course is drawn here.

Charts are matplotlib figures with units and what was measured in their titles; ``save`` writes
them as PNG into the lab's output folder. matplotlib is imported lazily (host side only).
"""
import os

PALETTE = {"isolated": "#2e7d32", "visible": "#c62828", "unknown": "#9e9e9e"}

#: the chart style on a screen, and on the lecture's projector (big_screen): larger type, thicker lines
STYLES = {
    False: {"figure.dpi": 100, "axes.titlesize": 12, "axes.labelsize": 10, "xtick.labelsize": 9,
            "ytick.labelsize": 9, "legend.fontsize": 9, "lines.linewidth": 1.5, "axes.linewidth": 0.8,
            "font.family": "DejaVu Sans"},
    True: {"figure.dpi": 130, "axes.titlesize": 20, "axes.labelsize": 17, "xtick.labelsize": 15,
           "ytick.labelsize": 15, "legend.fontsize": 15, "lines.linewidth": 3.0, "axes.linewidth": 1.6,
           "font.family": "DejaVu Sans"},
}
#: the page's type on the projector: the notebook, its tables and labkit's widgets, high contrast
BIG_SCREEN_CSS = """
body, :root:root {  /* over the theme's own :root values */
  --jp-content-font-size0: 20px; --jp-content-font-size1: 24px; --jp-content-font-size2: 28px;
  --jp-code-font-size: 22px; --jp-ui-font-size0: 17px; --jp-ui-font-size1: 20px; --jp-ui-font-size2: 24px;
  --jp-widgets-font-size: 20px; --jp-content-font-color1: #000; --jp-content-font-color2: #111;
}
.labkit-steps table, .labkit-live table, .labkit-record table { font-size: 20px; }
.labkit-steps .widget-button, .labkit-live .widget-button { height: 2.4em; font-size: 20px; }
"""
_SCREEN = {"big": os.environ.get("LABKIT_BIG_SCREEN") == "1"}


def is_big_screen():
    """True on the lecture's projector (``big_screen()`` was called, or ``labkit jupyter --big-screen``)."""
    return _SCREEN["big"]


def big_screen(on=True):
    """Large type and thick, high-contrast lines for a whole notebook, from this cell on: the charts'
    style, and (in JupyterLab) the page's type through a style sheet shown in this cell's output;
    ``big_screen(False)`` puts both back."""
    from IPython.display import HTML, display
    _SCREEN["big"] = bool(on)
    display(HTML(f"<style>{BIG_SCREEN_CSS}</style>" if on else ""), display_id="labkit-big-screen")


def live_fonts():
    """Sizes for the live bqplot charts (labkit.course.live), in the current screen's style."""
    big = is_big_screen()
    return {"title": {"font-size": "22px" if big else "14px"}, "label": "18px" if big else "12px",
            "width": "720px" if big else "480px", "height": "420px" if big else "300px", "stroke": 5 if big else 3}


def _plt():
    import matplotlib
    if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update(STYLES[is_big_screen()])
    return plt


def isolation_heatmap(df, title="What a process can see of the host", subtitle=""):
    """Heatmap of an isolation matrix: rows are configurations, columns what it sees or reaches (1 = host's)."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    values = df.astype(float).values
    fig, ax = plt.subplots(figsize=(1.3 * len(df.columns) + 3, 0.5 * len(df.index) + 1.8))
    cmap = ListedColormap([PALETTE["isolated"], PALETTE["visible"]])
    ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(df.columns)))
    ax.set_xticklabels(df.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(df.index)))
    ax.set_yticklabels(df.index)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, "host's" if values[i, j] >= 0.5 else "own", ha="center", va="center",
                    color="white", fontsize=9)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    ax.set_xlabel("red: it sees, shares or can reach the host's; green: its own, bounded, or nothing")
    fig.tight_layout()
    return fig


def save(fig, output_dir, name):
    """Save ``fig`` as ``output_dir/name.png`` and return the path (no-op when output_dir is falsy)."""
    if not output_dir:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name if name.endswith(".png") else name + ".png")
    fig.savefig(path, bbox_inches="tight")
    return path


def cpu_use_chart(df, quota, title="A busy loop under a CPU quota", subtitle=""):
    """CPU used per sampling interval (from the cgroup's own usage counter) against the quota line."""
    plt = _plt()
    t = df["t"].values
    used = df["cpu_usage_us"].diff().values / (df["t"].diff().values * 1e6)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(t[1:], used[1:], marker="o", color="#1565c0", label="CPU used by the group")
    if quota:
        ax.axhline(quota, color="#c62828", linestyle="--", label=f"quota: {quota:g} CPU")
    ax.set_ylim(0, max(1.05, (used[1:].max() if len(used) > 1 else 0) * 1.2))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("CPUs (cpu-seconds per second)")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def pids_chart(df, pids_max, title="A fork bomb against pids.max", subtitle=""):
    """Processes in the group and forks the kernel refused, over time."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(df["t"], df["pids_current"], marker="o", color="#1565c0", label="processes in the group")
    ax.axhline(pids_max, color="#c62828", linestyle="--", label=f"pids.max = {pids_max}")
    ax2 = ax.twinx()
    ax2.plot(df["t"], df["pids_refused"], color="#6a1b9a", alpha=0.6, label="forks refused (pids.events max)")
    ax2.set_ylabel("forks refused (cumulative)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("processes")
    ax.set_ylim(0, pids_max * 1.3)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right")
    fig.tight_layout()
    return fig


def topology_chart(topology, title="labkit networks, drawn from the live state", subtitle=""):
    """Bridges, their veth ports and the processes behind them, from Lab.topology() (the kernel's view)."""
    plt = _plt()
    from matplotlib.patches import FancyBboxPatch
    nets = topology or []
    width = max([len(n["members"]) for n in nets] + [1])
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * width), 1.2 + 2.8 * max(1, len(nets))))
    ax.set_xlim(0, max(3, width) * 2.6)
    ax.set_ylim(0, 2.8 * max(1, len(nets)) + 0.6)
    ax.axis("off")

    def box(x, y, w, h, text, color):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=color, ec="#37474f"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.5)

    for i, n in enumerate(nets):
        top = 2.8 * (len(nets) - i)
        total = max(3, width) * 2.6
        pub = ", ".join(f"{p['host_ip']}:{p['host_port']}->{p['ip']}:{p['container_port']}" for p in n["published"])
        box(total / 2 - 1.6, top - 0.9, 3.2, 0.7,
            f"bridge {n['bridge']}\n{n['gateway']} ({n['subnet']})" + (f"\npublished: {pub}" if pub else ""),
            "#bbdefb")
        for j, m in enumerate(n["members"]):
            x = 0.2 + j * 2.6
            ax.plot([x + 1.1, total / 2], [top - 1.8, top - 0.9], color="#546e7a")
            box(x, top - 2.5, 2.2, 0.7, f"{m.get('owner', '?')}\n{m.get('veth')} <-> eth0\n{m.get('ip', '')}",
                "#c8e6c9")
    if not nets:
        ax.text(0.5, 0.5, "no labkit network", transform=ax.transAxes, ha="center")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    return fig


CASE_COLORS = {"native": "#455a64", "process": "#455a64", "unshare": "#78909c", "labkit": "#1565c0",
               "container": "#1565c0", "container (bridge)": "#1565c0", "container (NAT)": "#64b5f6",
               "crun": "#6a1b9a", "runc": "#ab47bc"}
VM_COLOR = "#e65100"


def _case_color(case):
    return VM_COLOR if str(case).startswith("VM") or case == "vm" else CASE_COLORS.get(case, "#607d8b")


def startup_chart(summary, title="Start-up: asking for it to its first useful instruction", subtitle=""):
    """Median start-up per case with min-max whiskers, on a log scale (milliseconds to seconds)."""
    plt = _plt()
    s = summary.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(s) + 1.8))
    y = range(len(s))
    err = [s["median"] - s["min"], s["max"] - s["median"]]
    ax.barh(list(y), s["median"], xerr=err, color=[_case_color(c) for c in s["case"]], capsize=3)
    ax.set_yticks(list(y))
    ax.set_yticklabels(s["case"])
    ax.invert_yaxis()
    ax.set_xscale("log")
    for i, v, hi in zip(y, s["median"], s["max"]):
        ax.text(hi * 1.15, i, f"{v:.1f} ms" if v < 1000 else f"{v / 1000:.2f} s", va="center", fontsize=9)
    ax.set_xlabel("milliseconds (log scale); bar = median, whiskers = min..max")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    return fig


def overhead_chart(ratios, title="What isolation costs: time relative to native (same run)", subtitle="",
                   intervals=None):
    """Grouped bars of each case's median time over native's (1.0 = no overhead), log scale; with ``intervals``
    (:meth:`labkit.course.bench.BenchResult.intervals`), each bar's 95% interval as an error bar, and a bar whose
    interval holds 1.0 drawn hatched and labelled "≈1": no measurable difference."""
    plt = _plt()
    import numpy as np
    ratios = ratios.copy()
    if "container (bridge)" in ratios.columns:  # one container colour: the bridge is its network path
        base = ratios["container"] if "container" in ratios.columns else np.nan
        ratios["container"] = ratios["container (bridge)"].combine_first(base) if "container" in ratios.columns \
            else ratios["container (bridge)"]
        ratios = ratios.drop(columns=["container (bridge)"])
    order = ["container", "container (NAT)"]
    cols = [c for c in order if c in ratios.columns] + [c for c in ratios.columns
                                                        if c not in order and c != "native"]
    fig, ax = plt.subplots(figsize=(1.2 * len(ratios.index) + 3.5, 4.2))
    x = np.arange(len(ratios.index))
    width = 0.8 / max(len(cols), 1)
    spans = {}
    if intervals is not None and not intervals.empty:
        for row in intervals.itertuples():
            case = "container" if row.case == "container (bridge)" else row.case
            spans[(row.experiment, case)] = (row.low, row.high)
    for k, c in enumerate(cols):
        vals = ratios[c].values.astype(float)
        label = "container (network: veth + bridge)" if c == "container" else c
        xs = x + k * width - 0.4 + width / 2
        got = [spans.get((e, c)) for e in ratios.index]
        holds_one = [bool(g) and g[0] <= 1.0 <= g[1] for g in got]
        ax.bar(xs, vals, width, label=label, color=_case_color(c),
               hatch=["//" if h else "" for h in holds_one], edgecolor="white")
        if spans:
            low = [v - g[0] if g and np.isfinite(v) else 0 for v, g in zip(vals, got)]
            high = [g[1] - v if g and np.isfinite(v) else 0 for v, g in zip(vals, got)]
            ax.errorbar(xs, vals, yerr=[np.maximum(low, 0), np.maximum(high, 0)], fmt="none", ecolor="black",
                        elinewidth=1, capsize=2)
        for xi, v, g, h in zip(xs, vals, got, holds_one):
            if np.isfinite(v):
                top = max(v, g[1]) if g else v
                ax.text(xi, top * 1.05, "≈1" if h else f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(ratios.index, rotation=20, ha="right")
    ax.set_ylabel("median time / native median time (log)" + ("\nerror bars: 95% interval" if spans else ""))
    from matplotlib.patches import Patch
    handles = [Patch(facecolor=_case_color(c), label="container (network: veth + bridge)" if c == "container" else c)
               for c in cols]
    if spans:
        handles.append(Patch(facecolor="white", edgecolor="gray", hatch="//",
                             label="≈1: the interval holds 1.0, no measurable difference"))
    ax.legend(handles=handles, fontsize=8)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    return fig


def density_chart(samples, vm_label="VM", title="Idle memory per instance as instances grow", subtitle=""):
    """Median PSS per instance (MiB, log scale) against the number of instances, containers vs VMs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for case, g in samples.groupby("case"):
        per = g.groupby("instances")["pss_kb"].median() / 1024
        label = vm_label if case == "vm" else "container"
        ax.plot(per.index, per.values, marker="o", color=_case_color(case), label=label + " (PSS)")
        drop = g.groupby("instances")["mem_available_drop_kb"].median() / 1024
        drop = drop[drop > 0]  # the host's free memory moves for other reasons too: only rises are drawn
        if not drop.empty:
            ax.plot(drop.index, drop.values, marker="x", ls=":", color=_case_color(case),
                    label=label + " (host MemAvailable drop)")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("instances running at once")
    ax.set_ylabel("MiB per instance (log)")
    ax.legend(fontsize=8)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    return fig


def score_histogram(totals, out_of, title="The class's totals", subtitle=""):
    """Histogram of students' total points (``totals``: a pandas Series), out of ``out_of``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bins = max(1, min(20, int(out_of) or 1))
    ax.hist(list(totals), bins=bins, range=(0, out_of or 1), color=PALETTE["isolated"], edgecolor="white")
    ax.set_xlabel(f"total points (out of {out_of:g})")
    ax.set_ylabel("students")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    return fig


#: lab 09's images, one colour each in every chart (others take the next free colour)
IMAGE_COLORS = {"busybox:latest": "#2e7d32", "course/web:v2": "#1565c0", "course/web:broken": "#c62828"}
NODE_COLORS = ("#1565c0", "#2e7d32", "#e65100", "#6a1b9a", "#00838f", "#ad1457", "#5d4037", "#455a64", "#9e9d24")


def recovery_chart(timeline, away_from=None, title=None, subtitle=""):
    """Lab 09: a service's running tasks per node over time (stacked), the events (e.g. a node's power cut) and
    the moment the service had all its replicas again (none on ``away_from``); below, the requests made to its
    published port meanwhile, answered and failed, per 0.1 s. ``timeline``: labkit.course.orchestrate.Timeline."""
    plt = _plt()
    import numpy as np
    s, t0 = timeline.samples, timeline.t0
    nodes = [c for c in s.columns if c != "t"]
    t = s["t"].values - t0
    has_load = timeline.requests is not None and len(timeline.requests)
    fig, axes = plt.subplots(2 if has_load else 1, 1, figsize=(8, 5.2 if has_load else 3.8), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1.3]} if has_load else None)
    ax = axes[0][0]
    ax.stackplot(t, *[s[n].values for n in nodes], labels=nodes, step="post",
                 colors=[NODE_COLORS[i % len(NODE_COLORS)] for i in range(len(nodes))], alpha=0.85)
    ax.axhline(timeline.replicas, color="black", lw=1, ls=":", label=f"replicas wanted: {timeline.replicas}")
    for when, label in timeline.events:
        ax.axvline(when - t0, color="#c62828", ls="--", lw=1.5)
        ax.text(when - t0, timeline.replicas + 0.35, " " + label, color="#c62828", fontsize=9, va="bottom")
    healed = timeline.recovered(away_from)
    if healed is not None and timeline.events:
        ax.axvline(healed, color="#2e7d32", ls="--", lw=1.5)
        ax.text(healed, timeline.replicas + 0.95, f" all {timeline.replicas} running again: +{healed:.2f} s",
                color="#2e7d32", fontsize=9, va="bottom")
    ax.set_ylim(0, timeline.replicas + 2.2)
    ax.set_ylabel(f"running tasks of {timeline.service}")
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    ax.set_title((title or f"Tasks of {timeline.service} per node, as the manager recorded them")
                 + (f"\n{subtitle}" if subtitle else ""))
    if has_load:
        r, bx = timeline.requests, axes[1][0]
        r = r[(r["t"] >= s["t"].min()) & (r["t"] <= s["t"].max())]  # the requests made while we watched
        rt = r["t"].values - t0
        edges = np.arange(t.min(), t.max() + 0.1, 0.1)
        ok, _ = np.histogram(rt[r["ok"].values], bins=edges)
        bad, _ = np.histogram(rt[~r["ok"].values], bins=edges)
        bx.bar(edges[:-1], ok, width=0.1, align="edge", color="#90a4ae", label="answered")
        bx.bar(edges[:-1], bad, width=0.1, align="edge", bottom=ok, color="#c62828", label="failed")
        for when, _ in timeline.events:
            bx.axvline(when - t0, color="#c62828", ls="--", lw=1.5)
        failed, total = int((~r["ok"]).sum()), len(r)
        bx.set_ylabel("requests\nper 0.1 s")
        bx.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title=f"{failed} of {total}\nfailed",
                  title_fontsize=8)
        axes[1][0].set_xlabel("seconds since " + (timeline.events[0][1] if timeline.events else "the start"))
    else:
        ax.set_xlabel("seconds since " + (timeline.events[0][1] if timeline.events else "the start"))
    fig.tight_layout()
    return fig


def rollout_chart(samples, title="A rolling update, slot by slot", subtitle=""):
    """Lab 09: which image each slot of a service ran over time (one bar per slot; pale while the task is still
    starting, i.e. before its first health check passed). ``samples``: rows t, slot, image, state (from
    labkit.course.orchestrate.watch_update)."""
    plt = _plt()
    from matplotlib.patches import Patch
    times = sorted(set(samples["t"]))
    step = {a: (b - a) for a, b in zip(times, times[1:])}
    last = (times[-1] - times[-2]) if len(times) > 1 else 0.1
    images = list(dict.fromkeys(samples["image"]))
    spare = iter(c for c in NODE_COLORS if c not in IMAGE_COLORS.values())
    colors = {img: IMAGE_COLORS.get(img) or next(spare, "#9e9e9e") for img in images}
    slots = sorted(set(samples["slot"]))
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(slots) + 1.8))
    for _, row in samples.iterrows():
        ax.broken_barh([(row["t"], step.get(row["t"], last))], (row["slot"] - 0.35, 0.7),
                       facecolors=colors[row["image"]], alpha=1.0 if row["state"] == "running" else 0.35)
    ax.set_yticks(slots)
    ax.set_yticklabels([f"slot {s}" for s in slots])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the update began")
    ax.legend(handles=[Patch(color=colors[i], label=i) for i in images]
              + [Patch(color="#9e9e9e", alpha=0.35, label="starting (no health check passed yet)")],
              loc="upper center", bbox_to_anchor=(0.5, -0.28), fontsize=8, ncol=len(images) + 1)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    return fig


#: the lecture's history of containers, each step with the lab that rebuilds its mechanism: (year, what, lab)
HISTORY = [
    (1979, "chroot\n(Unix V7)", "01"), (2000, "FreeBSD Jail", "02"), (2001, "Linux VServer", "02"),
    (2004, "Solaris Zones", "02"), (2005, "OpenVZ", "03"), (2006, "Process Containers\n→ cgroups (2008)", "03"),
    (2008, "LXC", "02+03"), (2013, "Docker", "04-06"), (2014, "Kubernetes\n(1.0 2015)", "09"),
    (2015, "OCI", "04, 07"),
]


def history_timeline(events=HISTORY, title="Containers, from chroot to Kubernetes: and the lab that rebuilds each",
                     subtitle=""):
    """The lecture's timeline (chroot → Jail → VServer → Zones → OpenVZ → cgroups → LXC → Docker → Kubernetes →
    OCI), each step labelled with the lab where students build its mechanism."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(12, 3.8))
    ax.axhline(0, color="#555", lw=1.5)
    for k, (year, what, lab) in enumerate(events):  # evenly spaced, in order (the years are not to scale)
        up = 1 if k % 2 == 0 else -1
        ax.plot([k, k], [0, 0.5 * up], color="#888", lw=1)
        ax.scatter([k], [0], color=PALETTE["isolated"], zorder=3, s=30)
        ax.text(k, 0.55 * up, f"{what}\n{year} · lab {lab}", ha="center", va="bottom" if up > 0 else "top",
                fontsize=8.5, bbox={"boxstyle": "round,pad=0.3", "fc": "#f4f8f4", "ec": "#9bbf9d"})
    ax.set_xlim(-0.8, len(events) - 0.2)
    ax.set_ylim(-1.8, 1.8)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    return fig


def two_stacks(facts, title="A VM carries a kernel of its own; containers share the host's", subtitle=""):
    """The lecture's two stacks drawn from this run's facts: ``facts`` = {'host_kernel', 'host_boot', 'containers':
    [(name, boot id)], 'vm': {'kernel', 'boot', 'accel'} or None}. A box's colour says whose kernel it is: each
    boot id its own colour, so the containers' boxes are the host's colour and the VM's guest kernel is not."""
    plt = _plt()
    from matplotlib.patches import FancyBboxPatch
    fig, ax = plt.subplots(figsize=(11, 5.2))
    host = facts["host_boot"][:8]
    colours = {host: "#c8e6c9"}

    def colour(boot):
        return colours.setdefault(boot[:8], ["#ffe0b2", "#bbdefb", "#f8bbd0"][(len(colours) - 1) % 3])

    def box(x, y, w, h, text, fc):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.05", fc=fc, ec="#444"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)

    host_text = f"host kernel {facts['host_kernel']}\nboot id {host}…"
    # the VM's stack (left)
    box(0.0, 0.0, 4.6, 0.7, "hardware (this machine's CPUs and memory)", "#eeeeee")
    box(0.0, 0.8, 4.6, 0.9, host_text, colour(host))
    vm = facts.get("vm")
    if vm:
        box(0.0, 1.8, 4.6, 0.8, f"hypervisor: qemu ({vm['accel'].upper()})", "#fff9c4")
        box(0.0, 2.7, 4.6, 0.9, f"guest kernel {vm['kernel']}\nboot id {vm['boot'][:8]}…", colour(vm["boot"]))
        box(0.0, 3.7, 4.6, 0.8, "guest OS userland → the application", "#f5f5f5")
    else:
        box(0.0, 1.8, 4.6, 2.7, "no VM was booted in this run", "#fafafa")
    # the containers' stack (right)
    box(5.4, 0.0, 4.6, 0.7, "hardware (the same machine)", "#eeeeee")
    box(5.4, 0.8, 4.6, 0.9, host_text, colour(host))
    box(5.4, 1.8, 4.6, 0.8, "container engine: labkit (namespaces, cgroups, overlay)", "#e1f5fe")
    boxes = facts.get("containers") or []
    w = 4.6 / max(len(boxes), 1)
    for k, (name, boot) in enumerate(boxes):
        shared = "shares the host's kernel" if boot[:8] == host else "another kernel?"
        box(5.4 + k * w, 2.7, w - 0.1, 1.8, f"{name}\nboot id {boot[:8]}…\n{shared}", colour(boot))
    ax.text(2.3, 4.75, "virtual machine", ha="center", fontsize=11, weight="bold")
    ax.text(7.7, 4.75, "containers", ha="center", fontsize=11, weight="bold")
    ax.set_xlim(-0.2, 10.2)
    ax.set_ylim(-0.2, 5.1)
    ax.axis("off")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    return fig
