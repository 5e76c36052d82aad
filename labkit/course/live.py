"""Live views: widgets that follow the target while something runs on it, for the lecture's projector.

A :class:`LiveView` reads the target every ``interval`` seconds (never faster than :data:`MIN_INTERVAL`) in
one thread of the kernel and updates its widget; it stops when the widget is closed, when :meth:`stop` is
called, or after ``max_seconds`` (a view left open in a forgotten tab does not poll for ever). The views:

- :func:`cgroup_usage`: a cgroup's memory against its limit and its CPU use against its quota, as live
  bqplot lines (a kept widget library: the chart updates in place, no picture is redrawn);
- :func:`topology`: the labkit networks as the kernel has them (bridges, veths, addresses, published ports)
  while containers come and go;
- :func:`layers`: a container's image layers and what its writable upper directory holds, as files change;
- :func:`processes`: the processes labkit started, with their PIDs on the host and inside and which
  namespaces are their own.

Executed headless (``LABKIT_HEADLESS=1``), :meth:`LiveView.show` takes ``headless_samples`` readings in
the cell itself and leaves the last view in the notebook; nothing waits for anyone.
"""
import html
import threading
import time

from ..wire.errors import LabkitError
from .steps import HEADLESS

#: the shortest refresh: every reading is a request to the agent
MIN_INTERVAL = 0.25


class LiveView:
    """``update()`` reads the target and sets the widget; ``show()`` displays it and starts the refresh."""

    def __init__(self, interval=1.0, max_seconds=600):
        if not isinstance(interval, (int, float)) or interval < MIN_INTERVAL:
            raise LabkitError(f"interval={interval!r} is too short", fix=f"use {MIN_INTERVAL} s or more")
        self.interval, self.max_seconds = float(interval), float(max_seconds)
        self.samples = 0
        self.error = None
        self._stop = threading.Event()
        self._thread = None
        self.box = None

    # to fill in: the widget (built once) and one reading
    def build(self):
        raise NotImplementedError

    def update(self):
        raise NotImplementedError

    def widget(self):
        if self.box is None:
            import ipywidgets as w
            view = self

            class Box(w.VBox):
                def close(self):  # closing the widget ends its refresh
                    view.stop()
                    super().close()
            self.status = w.HTML()
            self.box = Box([*self.build(), self.status])
            self.box.add_class("labkit-live")
        return self.box

    def _tick(self):
        try:
            self.update()
            self.samples += 1
        except LabkitError as exc:  # the thing watched went away: say so and stop
            self.error = exc
            self.status.value = f"<small>stopped: {html.escape(str(exc).splitlines()[0])}</small>"
            self._stop.set()

    def _run(self):
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            self._tick()
            self._stop.wait(self.interval)
        if not self.error:
            self.status.value = f"<small>{self.samples} readings, every {self.interval:g} s; stopped</small>"

    def start(self):
        """Refresh in the background (one thread) until closed, stopped, or ``max_seconds`` have passed."""
        self.widget()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self.status.value = f"<small>live: every {self.interval:g} s</small>"
            self._thread = threading.Thread(target=self._run, name=f"labkit-live-{type(self).__name__}", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.interval))
        return self

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def show(self, headless_samples=3):
        """Display the view and refresh it live; headless, take ``headless_samples`` readings here instead."""
        from IPython.display import display
        display(self.widget())
        if HEADLESS:
            for i in range(headless_samples):
                self._tick()
                if i + 1 < headless_samples and not self.error:
                    time.sleep(self.interval)
            if not self.error:
                self.status.value = f"<small>{self.samples} readings (run headless: not live)</small>"
            return self
        return self.start()


class _HtmlView(LiveView):
    """A view that is one HTML widget, ``self.html``, set by ``update()``."""

    def build(self):
        import ipywidgets as w
        self.html = w.HTML()
        return [self.html]


class cgroup_usage(LiveView):  # noqa: N801 - used like a function: live.cgroup_usage(lab, cg).show()
    """Memory (MiB) against the limit and CPU (% of one CPU) against the quota of cgroup ``cg``, the last
    ``window`` seconds, as two live bqplot charts."""

    def __init__(self, lab, cg, window=60, interval=1.0, max_seconds=600):
        super().__init__(interval, max_seconds)
        self.lab, self.name = lab, getattr(cg, "name", cg)
        self.window = window
        self.t, self.mem, self.cpu = [], [], []
        self._last = None
        self.limits = {}

    def build(self):
        import bqplot as bq
        import ipywidgets as w
        from .plotting import live_fonts
        f = live_fonts()  # the one chart style: big on the projector
        figs = []
        for title, unit, color in (("memory", "MiB", "#1f77b4"), ("CPU", "% of one CPU", "#d62728")):
            x, y = bq.LinearScale(), bq.LinearScale(min=0)
            line = bq.Lines(x=[], y=[], scales={"x": x, "y": y}, colors=[color], stroke_width=f["stroke"])
            cap = bq.Lines(x=[], y=[], scales={"x": x, "y": y}, colors=["#555"], line_style="dashed")
            axes = [bq.Axis(scale=x, label="seconds", tick_style={"font-size": f["label"]}),
                    bq.Axis(scale=y, side="left", label=unit, tick_style={"font-size": f["label"]})]
            fig = bq.Figure(marks=[line, cap], title=f"{self.name}: {title}", axes=axes, title_style=f["title"],
                            layout=w.Layout(width=f["width"], height=f["height"]))
            figs.append((fig, line, cap))
        self.figs = figs
        return [w.HBox([f for f, _, _ in figs])]

    def update(self):
        s = self.lab.call("cgroup.stats", name=self.name)
        now = s["time"]
        self.t0 = getattr(self, "t0", now)
        cpu = None
        if self._last is not None and now > self._last[0]:
            cpu = 100.0 * (s["cpu_usage_us"] - self._last[1]) / 1e6 / (now - self._last[0])
        self._last = (now, s["cpu_usage_us"])
        t = now - self.t0
        self.t.append(t)
        self.mem.append(s["memory_current"] / 2 ** 20)
        self.cpu.append(cpu if cpu is not None else 0.0)
        while self.t and self.t[0] < t - self.window:
            self.t.pop(0), self.mem.pop(0), self.cpu.pop(0)
        mem_max = s.get("memory_max")
        self.limits = {"memory_mib": mem_max / 2 ** 20 if mem_max and mem_max < 1 << 60 else None,
                       "cpu_percent": 100.0 * s["cpu_quota"] if s.get("cpu_quota") else None}
        for (fig, line, cap), ys, limit in zip(self.figs, (self.mem, self.cpu),
                                               (self.limits["memory_mib"], self.limits["cpu_percent"])):
            with line.hold_sync():
                line.x, line.y = list(self.t), list(ys)
            if limit is not None and self.t:
                cap.x, cap.y = [self.t[0], self.t[-1]], [limit, limit]


class topology(_HtmlView):  # noqa: N801 - used like a function: live.topology(lab).show()
    """Every labkit network as the kernel has it: bridge, address range, who is on it with which address,
    published ports; refreshed as containers start and stop."""

    def __init__(self, lab, interval=1.0, max_seconds=600):
        super().__init__(interval, max_seconds)
        self.lab = lab
        self.last = []

    def update(self):
        nets = self.lab.topology()
        self.last = nets
        parts = []
        for n in nets:
            rows = "".join(f"<tr><td>{html.escape(str(m.get('owner', '?')))}</td><td>{html.escape(str(m.get('veth', '')))}"
                           f"</td><td>{html.escape(str(m.get('ip', '')))}</td></tr>" for m in n.get("members", []))
            ports = ", ".join(html.escape(f"{p.get('host_port')}->{p.get('ip')}:{p.get('container_port')}")
                              for p in n.get("published") or [] if isinstance(p, dict))
            parts.append(f"<div style='display:inline-block;vertical-align:top;margin-right:2em'>"
                         f"<b>{html.escape(str(n.get('bridge')))}</b> {html.escape(str(n.get('subnet', '')))}, "
                         f"gateway {html.escape(str(n.get('gateway', '')))}"
                         f"<table><tr><th>on it</th><th>veth</th><th>address</th></tr>{rows}</table>"
                         + (f"<small>published: {ports}</small>" if ports else "") + "</div>")
        self.html.value = "".join(parts) or "<i>no labkit network on the target</i>"


class layers(_HtmlView):  # noqa: N801 - used like a function: live.layers(lab, container).show()
    """A container's (or an overlay root's) image layers, bottom first and read-only, and what its own writable
    upper directory holds now (files, whiteouts, opaque directories), as the files change."""

    def __init__(self, lab, root, interval=1.0, max_seconds=600):
        super().__init__(interval, max_seconds)
        self.lab = lab
        self.cid = getattr(root, "id", None) if hasattr(root, "start") else getattr(root, "name", root)
        self.changes = []

    def update(self):
        info = self.lab.call("overlay.info", cid=self.cid)
        self.changes = self.lab.call("overlay.changes", cid=self.cid)
        lowers = info.get("facts", {}).get("lowerdirs", [])
        rows = "".join(f"<tr><td>{i}</td><td><code>{html.escape(d.rsplit('/', 1)[-1][:19])}</code></td>"
                       f"<td>read-only</td></tr>" for i, d in enumerate(reversed(lowers), 1))
        upper = "".join(f"<tr><td><code>{html.escape(c['path'])}</code></td><td>{html.escape(c['kind'])}</td>"
                        f"<td>{'' if c.get('size') is None else c['size']}</td></tr>" for c in self.changes)
        self.html.value = (f"<div style='display:inline-block;vertical-align:top;margin-right:2em'>"
                           f"<b>{html.escape(str(info.get('image')))}: layers, top first</b><table>"
                           f"<tr><th>#</th><th>layer</th><th></th></tr>"
                           f"<tr><td>↑</td><td><b>upper (this container's)</b></td><td>writable</td></tr>{rows}"
                           f"</table></div><div style='display:inline-block;vertical-align:top'>"
                           f"<b>in the upper directory</b><table><tr><th>path</th><th>what</th><th>bytes</th></tr>"
                           f"{upper or '<tr><td colspan=3><i>nothing changed yet</i></td></tr>'}</table></div>")


class processes(_HtmlView):  # noqa: N801 - used like a function: live.processes(lab).show()
    """The processes labkit started on the target (lab.spawn), as the host sees them: PID on the host and
    inside, which namespaces are their own and which the host's, their root; as they start and stop."""

    NS = ("pid", "mnt", "uts", "ipc", "net", "user", "cgroup")

    def __init__(self, lab, interval=1.0, max_seconds=600):
        super().__init__(interval, max_seconds)
        self.lab = lab
        self.rows = []

    def update(self):
        rows = []
        for p in self.lab.processes():
            if not p.get("alive"):
                continue
            try:
                info = self.lab.call("proc.inspect", pid_id=p["id"])
            except LabkitError:  # gone between the list and the look
                continue
            shared = info.get("shares_with_host") or {}
            nspid = info.get("nspid") or [info.get("pid")]
            rows.append({"process": p["id"], "host PID": info.get("pid"),
                         "PID inside": nspid[-1] if len(nspid) > 1 else "(host's)",
                         "own namespaces": " ".join(n for n in self.NS if shared.get(n) is False) or "none",
                         "root": info.get("root"), "command": " ".join(info.get("cmdline") or [])[:60]})
        self.rows = rows
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ("process", "host PID", "PID inside", "own namespaces",
                                                                "root", "command"))
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.value = (f"<b>processes labkit started</b><table><tr>{head}</tr>{body}</table>" if rows
                           else "<i>no process started by labkit runs on the target</i>")
