"""Step widgets: a sequence of labkit steps a lecturer clicks through, live on the target.

A :class:`Step` is a title, what to say about it, ``do(seq)`` (runs the step on the target, returns its
record) and the objects it makes, named: ``makes=[("container", "six")]``. A :class:`Sequence` runs its steps
in order: :meth:`~Sequence.next`, :meth:`~Sequence.back` (undo the last step), :meth:`~Sequence.reset`
(undo every step, newest first), :meth:`~Sequence.play` (on to the end: what a notebook does headless).

Undoing never relies on what this kernel remembers: each step's objects are found on the target by their
exact names (``Lab.find``) and removed when they are there. So a sequence first undoes whatever an earlier
run of the same name left (a cell run twice, a kernel restarted half-way); closing its widget, and the
kernel's exit, undo the rest. Names are the sequence's own (``lk-step-<name>-...``; a network, which may
have 8 characters, ``st<name>``): nothing else is touched.

:meth:`Sequence.widget` is the ipywidgets view: Back / Next / Reset, the steps with where we are, the last
step's record (its commands and system calls, output, facts) and the live state beside it, read again
after every step. Executed headless (``LABKIT_HEADLESS=1``, set by ``labkit lab`` and the grader),
:meth:`Sequence.show` plays to the end first, so the widget state saved in the notebook shows the final view.
"""
import atexit
import html
import os
import threading
import weakref

from ..client.records import Record, html_table
from ..wire.errors import LabkitError, NotFound

#: whether notebooks run without anyone to click (papermill under ``labkit lab`` or ``labkit grade``)
HEADLESS = os.environ.get("LABKIT_HEADLESS") == "1"

KINDS = ("container", "process", "cgroup", "overlay", "rootfs", "network", "image")


class Step:
    """One step: ``do(seq)`` returns a Record (or a dict); ``makes`` lists (kind, name) of what it leaves;
    ``undo(seq)``, when given, puts back what it changed without making anything (a start: the stop)."""

    def __init__(self, title, explain, do, makes=(), undo=None):
        self.title, self.explain, self.do, self.undo = title, explain, do, undo
        self.makes = tuple(makes)
        for kind, _ in self.makes:
            if kind not in KINDS:
                raise LabkitError(f"a step cannot make a {kind!r}", fix=f"use one of {', '.join(KINDS)}")


def _undo_named(lab, kind, name):
    """Remove ``kind`` ``name`` from the target when it is there; True when something was removed."""
    if kind == "image":
        try:
            lab.image(name)
        except NotFound:
            return False
        lab.rmi(name)
        return True
    try:
        handle = lab.find(kind, name)
    except NotFound:
        return False
    if kind == "container":
        handle.rm(force=True)
    elif kind == "process":
        handle.stop()
    else:  # a found handle did not make its object, so its own undo would leave it: remove it by name
        handle.remove()
    return True


_OPEN = weakref.WeakSet()


@atexit.register
def _undo_all_at_exit():  # the kernel is shutting down (a restart, say): nothing half-made stays behind
    for seq in list(_OPEN):
        try:
            seq.reset()
        except Exception:  # noqa: BLE001 - going away: undo what can be undone
            pass


class Sequence:
    """``seq = Sequence(lab, "six", steps)``; ``seq.next()``, ``seq.back()``, ``seq.reset()``, ``seq.widget()``."""

    def __init__(self, lab, name, steps, title=None, state=None):
        if not name.replace("-", "").isalnum() or not name.islower() or len(name) > 20:
            raise LabkitError(f"sequence name {name!r} must be short lowercase letters, digits and '-'",
                              fix="e.g. 'six'")
        self.lab, self.name, self.steps = lab, name, list(steps)
        self.title = title or name
        self._state = state
        self.done = 0              # steps done, in order
        self.records = []          # the record of each step done
        self.ctx = {}              # handles the steps keep for the ones after them
        self._lock = threading.Lock()
        self._view = None
        self.cleared = self._undo_from(len(self.steps))  # what an earlier run of this name left
        _OPEN.add(self)

    def obj(self, suffix=""):
        """The name of an object this sequence makes (``lk-step-<name>[-suffix]``)."""
        return f"lk-step-{self.name}" + (f"-{suffix}" if suffix else "")

    # -- moving -------------------------------------------------------------------------------------
    def next(self):
        """Run the next step; returns its record. At the end, nothing more happens (returns None)."""
        with self._lock:
            if self.done >= len(self.steps):
                return None
            step = self.steps[self.done]
            try:
                rec = step.do(self)
            except BaseException:
                self._undo_step(self.done)  # a step that failed half-way leaves nothing of itself
                raise
            rec = Record(rec) if isinstance(rec, dict) and not isinstance(rec, Record) else rec
            self.records.append(rec)
            self.done += 1
        self._refresh()
        return rec

    def back(self):
        """Undo the last step done (what it made, by name)."""
        with self._lock:
            if self.done == 0:
                return
            self.done -= 1
            self.records.pop()
            self._undo_step(self.done)
        self._refresh()

    def reset(self):
        """Undo every step done, newest first (and anything of this sequence's names left on the target)."""
        with self._lock:
            self._undo_from(len(self.steps))
            self.done, self.records, self.ctx = 0, [], {}
        self._refresh()

    def play(self):
        """Every step left, in order (what runs headless)."""
        while self.done < len(self.steps):
            self.next()
        return self.records

    def _undo_step(self, i):
        if self.steps[i].undo is not None:
            try:
                self.steps[i].undo(self)
            except NotFound:
                pass
        for kind, name in reversed(self.steps[i].makes):
            _undo_named(self.lab, kind, name)

    def _undo_from(self, n):
        removed = []
        for i in reversed(range(n)):
            for kind, name in reversed(self.steps[i].makes):
                if _undo_named(self.lab, kind, name):
                    removed.append(f"{kind} {name}")
        return removed

    def close(self):
        """Undo everything and close the widget, if any (its last view stays as it was: a notebook saved
        afterwards shows where the sequence got to)."""
        view, self._view = self._view, None
        try:
            self.reset()
        finally:
            _OPEN.discard(self)
            if view is not None:
                view["box"].close()

    # -- the view -----------------------------------------------------------------------------------
    def state_html(self):
        """The live state beside the steps: what the sequence's ``state`` function reads from the target."""
        if self._state is None:
            return ""
        try:
            return self._state(self)
        except LabkitError as exc:
            return f"<pre>{html.escape(str(exc))}</pre>"

    def steps_html(self):
        items = []
        for i, s in enumerate(self.steps):
            mark = "✔" if i < self.done else ("▶" if i == self.done else "·")
            style = "font-weight:bold" if i == self.done else ""
            items.append(f"<li style='{style}'>{mark} {html.escape(s.title)}</li>")
        return f"<ol style='list-style:none;padding-left:0'>{''.join(items)}</ol>"

    def widget(self):
        """The ipywidgets view (Back / Next / Reset, the steps, the last record, the live state)."""
        import ipywidgets as w
        if self._view is not None:
            return self._view["box"]
        seq = self

        class Box(w.VBox):
            def close(self):  # closing the widget undoes the sequence
                try:
                    if seq._view is not None:
                        seq._view = None
                        seq.reset()
                finally:
                    super().close()

        back, nxt, reset = (w.Button(description=d, layout=w.Layout(width="9em")) for d in ("◀ Back", "Next ▶", "⟲ Reset"))
        title, steps, state, explain, error = w.HTML(), w.HTML(), w.HTML(), w.HTML(), w.HTML()
        record = w.Output(layout=w.Layout(border="1px solid #ccc", padding="4px"))
        for b, fn in ((back, self.back), (nxt, self.next), (reset, self.reset)):
            b.on_click(lambda _b, fn=fn: self._click(fn))
        box = Box([title, w.HBox([back, nxt, reset]), explain, error,
                   w.HBox([steps, state], layout=w.Layout(grid_gap="2em")), record])
        box.add_class("labkit-steps")
        self._view = {"box": box, "title": title, "steps": steps, "state": state, "record": record,
                      "explain": explain, "error": error, "back": back, "next": nxt}
        self._refresh()
        return box

    def _click(self, fn):
        view = self._view
        if view is not None:
            view["error"].value = ""
        try:
            fn()
        except LabkitError as exc:
            if self._view is not None:
                self._view["error"].value = (f"<pre style='color:#a00'>{html.escape(str(exc))}</pre>")
                self._refresh()

    def _refresh(self):
        view = self._view
        if view is None:
            return
        from IPython.display import HTML
        n = len(self.steps)
        view["title"].value = f"<h3>{html.escape(self.title)} — step {self.done} of {n}</h3>"
        view["steps"].value = self.steps_html()
        view["state"].value = self.state_html()
        last = self.steps[self.done - 1] if self.done else None
        view["explain"].value = f"<p>{html.escape(last.explain)}</p>" if last else "<p>Press Next to begin.</p>"
        view["back"].disabled = self.done == 0
        view["next"].disabled = self.done >= n
        view["record"].outputs = ()  # set, not captured: the same with a kernel's frontend, headless, or none
        rec = self.records[-1] if self.records else None
        if rec is not None:
            view["record"].append_display_data(HTML(rec._repr_html_() if hasattr(rec, "_repr_html_")
                                                    else f"<pre>{html.escape(str(rec))}</pre>"))

    def show(self, play=None):
        """Display the widget; headless (or ``play=True``) first plays to the end, so the saved view is the last."""
        from IPython.display import display
        if HEADLESS if play is None else play:
            self.play()
        display(self.widget())
        return self


# -- the sequences the labs use ----------------------------------------------------------------------------
def _containers_state(ctr, net):
    def state(seq):
        rows = [dict(r) for r in seq.lab.containers(all=True) if r.get("name") == ctr]
        out = html_table(rows, ["name", "state", "status", "ports"], title="containers") if rows else "<i>no container yet</i>"
        for n in seq.lab.networks():
            if n.get("spec", {}).get("name") == net:
                members = n.get("members") or {}
                out += html_table([{"member": k, "ip": v.get("ip") if isinstance(v, dict) else v}
                                   for k, v in members.items()], ["member", "ip"],
                                  title=f"network {net}: bridge lkbr-{net}, {n['spec'].get('subnet')}")
        return out
    return state


def docker_run(lab, name="six", cmd=("sh", "-c", "hostname; ip -o -4 addr show eth0; sleep 3600")):
    """What `docker run -i -t ubuntu /bin/bash` does, one step per Next (on busybox, built in: no network)."""
    ctr, net = f"lk-step-{name}", ("st" + name.replace("-", ""))[:8]

    def pull(seq):
        return Record(seq.lab.image("busybox"), what="the image busybox (built in here: Docker would pull it)")

    def network(seq):
        seq.ctx["net"] = seq.lab.network(net, subnet="10.214.7.0/24")
        return seq.ctx["net"].record

    def create(seq):
        seq.ctx["ctr"] = seq.lab.create("busybox", list(cmd), name=ctr, network=net)
        return seq.ctx["ctr"].record

    def start(seq):
        c = seq.ctx.get("ctr") or seq.lab.container(ctr)
        return c.start().record

    def stop(seq):
        seq.lab.container(ctr).stop(timeout=2)

    steps = [
        Step("pull the image", "Docker pulls ubuntu when it is not here; labkit's busybox image is built in.", pull),
        Step("a network to join", "A bridge with an address range: each container gets a veth on it.", network,
             makes=[("network", net)]),
        Step("create: a read-write layer on the image", "A container is its image's layers read-only, one "
             "writable layer on top (overlayfs), a cgroup and a config: nothing runs yet.", create,
             makes=[("container", ctr)]),
        Step("start: interface, IP, process", "A veth pair joins the bridge, the container's end gets an IP, and "
             "its process starts in new namespaces inside the cgroup. When the process ends, the container stops "
             "but is not deleted: its layer stays until `rm`.", start, undo=stop),
    ]
    return Sequence(lab, name, steps, title="docker run, step by step", state=_containers_state(ctr, net))


def build_a_container(lab, name="mech"):
    """A container made one kernel mechanism at a time: root filesystem, chroot, namespaces, cgroup, overlay,
    then a veth on a bridge and the process that uses them all."""
    obj, net = f"lk-step-{name}", ("st" + name.replace("-", ""))[:8]
    ns = ["uts", "pid", "mnt", "ipc", "net"]

    def rootfs(seq):
        seq.ctx["root"] = seq.lab.rootfs(obj, replace=True)
        return seq.ctx["root"].record

    def chroot(seq):
        return seq.lab.chroot(obj, ["sh", "-c", "echo '/ is now:'; ls /; echo; cat /etc/hostname"])

    def namespaces(seq):
        return seq.lab.run_in(["sh", "-c", "echo hostname $(hostname), pid $$; echo links: $(ls /sys/class/net)"],
                              ns, rootfs=obj, root_mode="pivot_root", hostname=name)

    def cgroup(seq):
        return seq.lab.cgroup(obj, memory="64M", cpus=0.5, pids=64).record

    def overlay(seq):
        seq.ctx["overlay"] = seq.lab.container_root("busybox", obj)
        return seq.ctx["overlay"].record

    def veth(seq):
        seq.lab.network(net, subnet="10.214.8.0/24")
        merged = (seq.ctx.get("overlay") or seq.lab.find("overlay", obj)).merged
        seq.ctx["proc"] = seq.lab.spawn(["sleep", "3600"], ns, name=obj, rootfs=merged, root_mode="pivot_root",
                                        cgroup=obj, network=net, hostname=name)
        return seq.ctx["proc"].record

    steps = [
        Step("a root filesystem", "A directory with a shell, its tools and an /etc: everything a container's "
             "files will be.", rootfs, makes=[("rootfs", obj)]),
        Step("chroot into it", "chroot(2) changes what / means for one process: it sees only that directory "
             "(and nothing else is isolated yet).", chroot),
        Step("namespaces", "New UTS, PID, mount, IPC and network namespaces: its own hostname, PID 1, mounts "
             "and an empty network; pivot_root moves its root for good.", namespaces),
        Step("a cgroup", "Limits the kernel enforces for a group of processes: 64 MiB of memory, half a CPU, "
             "64 processes.", cgroup, makes=[("cgroup", obj)]),
        Step("an overlay root", "The image's layers read-only below, a writable upper directory on top: what a "
             "container changes stays in its own layer.", overlay, makes=[("overlay", obj)]),
        Step("a veth on a bridge, and the process", "A veth pair joins the container's network namespace to a "
             "bridge, its end gets an address; the process starts with all of the above: a container.", veth,
             makes=[("network", net), ("process", obj)]),
    ]

    def state(seq):
        rows = []
        for kind, label in (("rootfs", "root filesystem"), ("cgroup", "cgroup"), ("overlay", "overlay root"),
                            ("process", "process"), ("network", "network")):
            try:
                seq.lab.find(kind, net if kind == "network" else obj)
                rows.append({"what": label, "on the target": "yes"})
            except NotFound:
                rows.append({"what": label, "on the target": "-"})
        return html_table(rows, ["what", "on the target"], title=f"{obj} on {seq.lab.target}")
    return Sequence(lab, name, steps, title="a container, one mechanism at a time", state=state)


def web_server(lab, name="web", port=8089):
    """The lecture's nginx walkthrough: build an image with a page in it, create and start a container with a
    published port, fetch the page from the host, change it from inside with exec, fetch it again. On nginx
    when the target has its image (pulled earlier), on busybox's httpd otherwise: the steps are the same."""
    from .checks import HTTP_GET
    image, ctr, net = f"lk-step-{name}:v1", f"lk-step-{name}", ("st" + name.replace("-", ""))[:8]
    url = f"http://127.0.0.1:{port}/"

    def nginx(seq):
        return any(i["ref"].split(":")[0] in ("nginx", "library/nginx") for i in seq.lab.images())

    def build(seq):
        have = nginx(seq)
        root = "/usr/share/nginx/html" if have else "/var/www"
        seq.ctx["root"] = root
        recipe = ("FROM nginx\n" if have else "FROM busybox\n") + f"COPY index.html {root}/index.html\n"
        if not have:
            recipe += 'CMD ["httpd", "-f", "-p", "80", "-h", "/var/www"]\n'
        return Record(seq.lab.build(recipe, image, context={"index.html": "<h1>Welcome to the course web server</h1>"}),
                      what=f"build {image} on {'nginx' if have else 'busybox httpd (offline)'}")

    def create(seq):  # on a network of its own, so that undoing it leaves the shared default network alone
        if net not in [n["spec"]["name"] for n in seq.lab.networks()]:
            seq.lab.network(net, subnet="10.214.9.0/24")
        return seq.lab.create(image, name=ctr, ports=[f"{port}:80"], network=net).record

    def start(seq):
        return seq.lab.container(ctr).start().record

    def fetch(seq):
        return seq.lab.run(["python3", "-c", HTTP_GET, url])  # (it waits a moment for the server to listen)

    def write_page(seq, text):
        root = seq.ctx.get("root") or ("/usr/share/nginx/html" if nginx(seq) else "/var/www")
        return seq.lab.container(ctr).exec(["sh", "-c", f"echo '<h1>{text}</h1>' > {root}/index.html"])

    def stop(seq):
        seq.lab.container(ctr).stop(timeout=1)

    steps = [
        Step("build the image", "A recipe: a base image and one layer with our page in it.", build,
             makes=[("image", image)]),
        Step("create, with a published port", f"`docker create -p {port}:80`: a DNAT rule will send the host's port "
             f"{port} to the container's port 80.", create, makes=[("network", net), ("container", ctr)]),
        Step("start", "The server runs in the container's namespaces, behind its veth.", start, undo=stop),
        Step("fetch the page from the host", f"GET {url}: through the published port to the container.", fetch),
        Step("change it from inside", "`docker exec`: a process joins the running container's namespaces and "
             "writes the page in its writable layer.", lambda seq: write_page(seq, "changed from inside"),
             undo=lambda seq: write_page(seq, "Welcome to the course web server")),
        Step("fetch it again", "The same URL, the changed page: the change lives in this container's upper layer "
             "only; the image is as built.", fetch),
    ]
    return Sequence(lab, name, steps, title="the web server walkthrough", state=_containers_state(ctr, net))
