"""The one place that owns labkit's chart style. Every chart in the course is drawn here.

Charts are matplotlib figures with units and what was measured in their titles; ``save`` writes
them as PNG into the lab's output folder. matplotlib is imported lazily (host side only).
"""
import os

PALETTE = {"isolated": "#2e7d32", "visible": "#c62828", "unknown": "#9e9e9e"}


def _plt():
    import matplotlib
    if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 100, "axes.titlesize": 12, "axes.labelsize": 10,
                         "font.family": "DejaVu Sans"})
    return plt


def isolation_heatmap(df, title="What a process can see of the host", subtitle=""):
    """Heatmap of an isolation matrix: rows are configurations, columns what is visible (1 = host's)."""
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
    ax.set_xlabel("what the process sees (red: the host's, green: its own or nothing)")
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
