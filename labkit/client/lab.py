"""The client's view of a target: ``Lab`` and the live handles it hands out.

``connect(target)`` picks a transport (:mod:`labkit.client.transport`) and returns a :class:`Lab`, whose
methods send one request each to the agent and wrap the answer: a :class:`~labkit.client.records.Record`
(what ran, what it established), or a live handle that undoes only what it made when its ``with``
block ends (:class:`Rootfs`, :class:`Process`). Specs are validated here first, so mistakes are
reported before anything reaches the target. Standard library only (charts load lazily).
"""
import os
import sys

from ..wire.errors import InvalidSpec, LabkitError, NotFound, PrivilegeError, UnsupportedHost
from .handles import (Cgroup, Container, Network, OverlayRoot, Process, Rootfs, VirtualMachine, _argv,  # noqa: F401
                      _rootfs_name, _spec_kw)
from ..wire.words import container_status
from .records import DoctorReport, Record
from ..wire.specs import (NAMESPACES, CgroupSpec, ContainerSpec, ImageRef, NetworkSpec, ProcessSpec, RootfsSpec, check_name,
                          nano_cpus, normalize_namespaces)
from . import transport as _t


def connect(target="auto", local=None, **options):
    """Return a :class:`Lab` for ``target``:

    - ``"auto"``: ``$LABKIT_TARGET`` if set; else in-process when this is Linux and we are root, else
      ``sudo`` on Linux, else the lab VM when one was created, else an error that says how to start it;
    - ``"vagrant"``: the lab VM (``vagrant ssh-config`` in labkit's ``vagrant/`` folder, or
      ``$LABKIT_VAGRANT_DIR``; options: ``vagrant_cmd``, ``netns``);
    - ``"local"``: in-process (root on Linux); ``"sudo"``: agent under ``sudo -n`` on this machine;
    - ``"ssh://user@host:port"`` (options: ``key_filename``, ``sudo``, ``python``): any Linux host;
    - ``"unix:///path"``: an agent, or the grader's relay to one, listening on a unix socket.

    ``local``: a callable that returns the in-process channel (the agent's own,
    :class:`labkit.agent.local.InProcess`); :func:`labkit.connect` passes it, so the client core never
    imports the agent.
    """
    if isinstance(target, Lab):
        return target
    if not isinstance(target, str) or not target:
        raise InvalidSpec(f"target {target!r} is not a target", fix="use 'auto', 'local', 'sudo' or 'ssh://user@host:port'")
    t = target.strip()
    if t == "auto":
        t = os.environ.get("LABKIT_TARGET", "auto")
    if t == "auto":
        if sys.platform != "linux":
            from . import vagrant
            if vagrant.is_configured():
                return connect("vagrant", local=local, **options)
            raise UnsupportedHost(f"this machine runs {sys.platform}; the container side needs Linux")
        if os.geteuid() == 0:
            return Lab(_in_process(local), target="local")
        try:
            return Lab(_t.sudo_transport(**options), target="sudo")
        except PrivilegeError:
            from . import vagrant
            if vagrant.is_configured():
                return connect("vagrant", local=local, **options)
            raise
    if t in ("local", "in-process", "inprocess"):
        return Lab(_in_process(local), target="local")
    if t == "sudo":
        return Lab(_t.sudo_transport(**options), target="sudo")
    if t.startswith("unix://"):
        return Lab(_t.UnixSocket(t[len("unix://"):], **options), target=t)
    if t.startswith("ssh://"):
        rest = t[len("ssh://"):]
        user, _, hostport = rest.rpartition("@")
        host, _, port = hostport.partition(":")
        if not host:
            raise InvalidSpec(f"no host in {target!r}", fix="write ssh://user@host:port")
        return Lab(_t.SSH(host, port=int(port or 22), user=user or None, **options), target=t)
    if t == "vagrant":
        from . import vagrant
        return Lab(vagrant.transport(**options), target="vagrant")
    raise InvalidSpec(f"unknown target {target!r}", fix="use 'auto', 'local', 'sudo' or 'ssh://user@host:port'")


def _in_process(local):
    if local is None:
        raise UnsupportedHost("the in-process target needs the agent's code in this process",
                              fix="connect with labkit.connect('local') (it brings the agent along), or use 'sudo'")
    return local()


class Lab:
    """A connected target. Every method is one request to the agent."""

    def __init__(self, transport, target=""):
        self.transport = transport
        self.target = target

    # -- plumbing ---------------------------------------------------------------------------------
    def call(self, method, **params):
        return self.transport.call(method, **params)

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        h = self.transport.hello or {}
        return (f"<Lab {self.target or self.transport.name} via {self.transport.name}: agent {h.get('version')} "
                f"protocol {h.get('protocol')} python {h.get('python')} on {h.get('machine')}>")

    @property
    def info(self):
        return dict(self.transport.hello or {})

    # -- the target -------------------------------------------------------------------------------
    def doctor(self):
        """What this target can do for the course (a table in a notebook)."""
        return DoctorReport(self.call("doctor"), what="labkit doctor")

    def run(self, argv, timeout=60, input=None, check=False):
        """Run a command on the target's host (as root, in the host's namespaces)."""
        res = Record(self.call("run", argv=_argv(argv), timeout=timeout, input=input, check=check))
        res["what"] = "run on the target"
        res["steps"] = [dict(res, kind="command")]
        return res

    def read_file(self, path):
        return self.call("read_file", path=path)

    def list_dir(self, path):
        return self.call("list_dir", path=path)

    def host_namespaces(self):
        """{namespace: inode} of the namespaces the agent runs in: the host's own."""
        return self.call("host_ns")

    # -- root filesystems -------------------------------------------------------------------------
    def rootfs(self, name="demo", image="busybox", hostname="labkit", replace=False):
        """Build (or reuse) a rootfs; returns a :class:`Rootfs` handle (``with`` removes it at the end)."""
        spec = RootfsSpec(name=name, image=image, hostname=hostname)
        rec = Record(self.call("rootfs.create", spec=spec.to_dict(), replace=replace))
        return Rootfs(self, spec, rec)

    def rootfs_names(self):
        return self.call("rootfs.list")

    # -- processes in namespaces ------------------------------------------------------------------
    def spec(self, argv=(), namespaces=(), **kw):
        if isinstance(argv, str):
            argv = _argv(argv)
        return ProcessSpec(argv=tuple(argv), namespaces=normalize_namespaces(namespaces), **_spec_kw(kw))

    def run_in(self, argv=(), namespaces=(), timeout=60, input=None, **kw):
        """Run ``argv`` in new namespaces (and optionally a rootfs) to completion; returns its record."""
        spec = self.spec(argv, namespaces, **kw)
        return Record(self.call("proc.run", spec=spec.to_dict(), timeout=timeout, input=input))

    def probe(self, namespaces=(), **kw):
        """Start a process in ``namespaces``, let it look around, and return what it saw (its record)."""
        return self.run_in((), namespaces, action="probe", **kw)

    def spawn(self, argv=(), namespaces=(), name=None, **kw):
        """Start a process that keeps running (default: one that just waits); returns a :class:`Process`."""
        spec = self.spec(argv, namespaces, action="exec" if argv else "hold", **kw)
        rec = Record(self.call("proc.start", spec=spec.to_dict(), name=name))
        return Process(self, rec["id"], rec)

    def find(self, kind, name):
        """A handle on something that exists on the target already: ``kind`` is 'rootfs', 'cgroup',
        'container', 'process', 'network', 'overlay' or 'vm', ``name`` its name (or id); NotFound when there
        is none.
        This is how the grader reaches, in a process of its own, what a submission made. A found rootfs or
        network is not removed when its handle's ``with`` block ends (this handle did not make it)."""
        if not isinstance(name, str) or not name:
            raise InvalidSpec(f"{kind} name {name!r} is not a name", fix="give the name the object was made with")
        if kind == "rootfs":
            return Rootfs(self, RootfsSpec(name=name), Record(self.call("rootfs.info", name=name)))
        if kind == "cgroup":
            spec = CgroupSpec(name=name)
            return Cgroup(self, spec, Record(self.call("cgroup.stats", name=spec.name)))
        if kind == "container":
            return self.container(name)
        if kind == "process":
            return self.process(check_name(name, "process id"))
        if kind == "overlay":
            return OverlayRoot(self, check_name(name, "container name"), Record(self.call("overlay.info", cid=name)))
        if kind == "network":
            state = self.call("net.inspect", name=NetworkSpec(name=name).name)
            return Network(self, NetworkSpec.from_dict(state["spec"]), Record(network=state, facts={"existed": True}))
        if kind == "vm":
            for st in self.call("vm.list"):
                if st.get("id") == name:
                    return VirtualMachine(self, name, Record(st))
            raise NotFound(f"no labkit VM {name!r} on the target", fix="start one with lab.vm_start()")
        raise InvalidSpec(f"no kind {kind!r} to find",
                          fix="one of rootfs, cgroup, container, process, network, overlay, vm")

    def process(self, pid_id):
        """A handle on an already started process (e.g. from an earlier session)."""
        return Process(self, pid_id, Record(self.call("proc.inspect", pid_id=pid_id)))

    def processes(self):
        return [Record(p) for p in self.call("proc.list")]

    def chroot(self, rootfs, argv, timeout=60):
        """Run ``argv`` with chroot(2) into ``rootfs`` and nothing else (no namespaces)."""
        return self.run_in(argv, (), rootfs=_rootfs_name(rootfs), root_mode="chroot", timeout=timeout)

    def escape(self, rootfs, pivot_root=False):
        """Try the classic chroot escape from inside ``rootfs``; ``.escaped`` says whether it worked."""
        if pivot_root:
            return self.run_in((), ("mnt",), rootfs=_rootfs_name(rootfs), root_mode="pivot_root", action="escape")
        return self.run_in((), (), rootfs=_rootfs_name(rootfs), root_mode="chroot", action="escape")

    # -- cgroups ----------------------------------------------------------------------------------
    def cgroup(self, name, memory=None, swap=None, cpus=None, cpu_weight=None, pids=None, cpuset=None,
               period_us=100000, devices=None):
        """Make a labkit cgroup with these limits; returns a :class:`Cgroup` (``with`` removes it).
        ``devices='docker'``: only the devices Docker lets a container open."""
        spec = CgroupSpec(name=name, memory=memory, swap=swap, cpus=cpus, cpu_weight=cpu_weight, pids=pids,
                          cpuset=cpuset, period_us=period_us, devices=devices)
        return Cgroup(self, spec, Record(self.call("cgroup.create", spec=spec.to_dict())))

    def cgroup_mode(self):
        """{'mode': 'v1'|'v2'|'hybrid', ...}: the target's cgroup layout."""
        return self.call("cgroup.detect")

    # -- images and overlay -----------------------------------------------------------------------
    def images(self):
        """The images on the target: ref, id, number of layers, size."""
        return [Record(i) for i in self.call("image.list")]

    def image(self, ref="busybox"):
        """One image: its layers (bottom first), config and history."""
        return Record(self.call("image.inspect", ref=str(ImageRef.parse(ref))))

    def build(self, recipe, tag, context=None, no_cache=False):
        """Build a recipe (FROM, RUN, COPY, ENV, WORKDIR, CMD) into image ``tag``; ``context``: {name: text}.

        Every line is a cached step; the record lists which steps were rebuilt and how long each took."""
        ref = str(ImageRef.parse(tag))
        rec = Record(self.call("image.build", recipe=recipe, ref=ref, context=dict(context or {}),
                               no_cache=no_cache))
        rec["what"] = f"build {ref}"
        return rec

    def tag(self, src, dst):
        return Record(self.call("image.tag", src=str(ImageRef.parse(src)), dst=str(ImageRef.parse(dst))))

    def rmi(self, ref, force=False):
        """`docker rmi`: refused while any container (running or not) was made from the image; ``force``
        (`rmi -f`): the name goes all the same (the containers keep their layers)."""
        return Record(self.call("image.rmi", ref=str(ImageRef.parse(ref)), force=bool(force)))

    def pull(self, ref, username=None, password=None):
        """Pull an image from a registry (OCI distribution API; digests verified)."""
        return Record(self.call("image.pull", ref=str(ImageRef.parse(ref)), username=username, password=password))

    def push(self, ref, username=None, password=None):
        """Push a local image to the registry its name points at (host[:port]/name:tag)."""
        return Record(self.call("image.push", ref=str(ImageRef.parse(ref)), username=username, password=password))

    def search(self, term, registry="127.0.0.1:5000"):
        """``docker search``: rows {name, description, stars, official} of the repositories in a registry's
        catalog whose name contains ``term`` (``registry="docker.io"``: Docker Hub's search, online only)."""
        return self.call("image.search", term=term, host=registry)

    def prune(self, cache_keys=None, all_cache=False):
        """Forget build-cache entries (given keys, or all) and delete the layers nothing refers to."""
        return Record(self.call("image.prune", cache_keys=list(cache_keys or []), all_cache=all_cache))

    def run_bundle(self, ref, argv=None, runtime="crun", timeout=60):
        """Run an image the OCI runtime spec's way, by ``runtime`` (crun or runc) instead of labkit: a bundle (its
        root and a config.json) made on the target, ``RUNTIME run --bundle`` for at most ``timeout`` seconds,
        removed afterwards. The record has the config.json (``["config"]``), the output and the exit code."""
        return Record(self.call("oci.run_bundle", ref=str(ImageRef.parse(ref)),
                                argv=list(argv) if argv else None, runtime=runtime, timeout=timeout))

    def export_image(self, ref, path):
        """Write an image as an OCI image layout directory on the target (skopeo, podman, ... read it)."""
        return Record(self.call("image.export", ref=str(ImageRef.parse(ref)), dest=path))

    def import_image(self, path, ref, tag=None):
        """Import an OCI image layout directory from the target's disk (digests verified)."""
        return Record(self.call("image.import", src=path, ref=str(ImageRef.parse(ref)), tag_name=tag))

    def container_root(self, image="busybox", name="demo"):
        """Mount an overlay root for a container of ``image``: layers below, a writable upper on top."""
        check_name(name, "container name")
        rec = Record(self.call("overlay.create", ref=str(ImageRef.parse(image)), cid=name))
        return OverlayRoot(self, name, rec)

    # -- networks ---------------------------------------------------------------------------------
    def network(self, name="default", subnet="10.213.0.0/24"):
        """A labkit bridge network (made if missing): bridge lkbr-<name>, gateway .1, NAT to the outside."""
        spec = NetworkSpec(name=name, subnet=subnet)
        return Network(self, spec, Record(self.call("net.create", spec=spec.to_dict())))

    def networks(self):
        return [Record(n) for n in self.call("net.list")]

    def topology(self):
        """Live state of every labkit network: bridge, ports, members, addresses, published ports."""
        return self.call("net.topology")

    # -- the engine (docker-like containers) -------------------------------------------------------
    def create(self, image="busybox", cmd=None, name=None, env=None, hostname=None, ports=(), memory=None,
               cpus=None, pids_limit=None, volumes=(), read_only=False, workdir=None, user=None, network="default",
               cap_add=(), cap_drop=(), privileged=False, tty=False, interactive=False, add_hosts=()):
        """`docker create`: returns a :class:`Container` (its root, cgroup and config; nothing runs yet).
        ``tty`` (-t): a terminal of its own as its stdio; ``interactive`` (-i): a stdin attached clients write to;
        ``add_hosts`` (--add-host NAME:IP): lines of its own /etc/hosts.
        ``memory`` in bytes or "64M", ``cpus`` as Docker's --cpus (0.5); the spec stores bytes and nano-CPUs
        (:class:`~labkit.wire.specs.ContainerSpec`), which is what ``inspect()`` shows.
        Docker's 14 default capabilities (``cap_add``/``cap_drop`` change them) and a read-only /proc/sys,
        unless ``privileged``."""
        spec = ContainerSpec(image=image, name=name, cmd=_argv(cmd) if cmd else None, env=env or {},
                             hostname=hostname, ports=tuple(ports or ()), memory=memory,
                             nano_cpus=None if cpus is None else nano_cpus(cpus), pids_limit=pids_limit,
                             binds=tuple(volumes or ()), read_only=read_only, workdir=workdir, user=user,
                             network=network, cap_add=tuple(cap_add or ()), cap_drop=tuple(cap_drop or ()),
                             privileged=privileged, tty=tty, open_stdin=interactive, stdin_once=interactive,
                             extra_hosts=tuple(add_hosts or ()))
        rec = Record(self.call("container.create", spec=spec.to_dict()))
        return Container(self, rec["id"], rec["name"], rec)

    def run_container(self, image="busybox", cmd=None, detach=True, rm=False, timeout=600, **kw):
        """`docker run`: create and start; with ``detach=False`` wait for it and return its exit code and log."""
        c = self.create(image, cmd, **kw)
        try:
            c.start()
        except LabkitError:
            c.rm(force=True)
            raise
        if detach:
            return c
        res = c.wait(timeout)
        out = Record(exit_code=res["exit_code"], logs=c.logs(), name=c.name, id=c.id)
        if rm:
            c.rm(force=True)
        return out

    def container(self, ref):
        """A handle on an existing container (by name or id)."""
        info = self.call("container.inspect", ref=ref)
        return Container(self, info["Id"], info["Name"].lstrip("/"), Record(info))

    def containers(self, all=False):
        """`docker ps [-a]`."""
        return [Record(r, status=container_status(r)) for r in self.call("container.ps", all=all)]

    # -- the VM baseline --------------------------------------------------------------------------
    def vm(self, command="true", memory_mb=256, cpus=1, timeout=180, accel=None):
        """Boot a real VM (qemu; KVM when the probe says it works, else TCG) and run ``command`` in it."""
        return Record(self.call("vm.boot", command=command, memory_mb=memory_mb, cpus=cpus, timeout=timeout,
                                accel_mode=accel))

    def vm_missing(self):
        """None when this target can boot the VM baseline; else why not, with the fix (one sentence).
        Cheap: it looks for qemu, a kernel in /boot and busybox, and boots nothing."""
        m = self.call("vm.missing")
        return None if m is None else f"{m['reason']} ({m['fix']})"

    def vm_start(self, memory_mb=256, cpus=1, accel=None, network=None, disk_mb=0, timeout=180, foreign=False):
        """Boot a VM that stays up and takes commands (``.exec``); ``with`` stops it. ``network``: a labkit
        network for a virtio NIC on a tap; ``disk_mb``: a virtio disk (ext4, mounted at /mnt); ``foreign``: the
        other CPU architecture's guest (:meth:`foreign_guest`), emulated under TCG."""
        if network and network not in [n["spec"]["name"] for n in self.networks()]:
            self.network(network)
        rec = Record(self.call("vm.start", memory_mb=memory_mb, cpus=cpus, accel_mode=accel, network_name=network,
                               disk_mb=disk_mb, timeout=timeout, foreign=bool(foreign)))
        return VirtualMachine(self, rec["id"], rec)

    def foreign_guest(self):
        """The other CPU architecture's kernel and busybox on the target (aarch64 on an x86_64 one):
        {'machine', 'busybox', 'bin_dir', 'kernel', 'qemu'}, or {'missing', 'fix'}."""
        return self.call("vm.foreign")

    # -- housekeeping -----------------------------------------------------------------------------
    def release(self, *handles):
        """Undo the given handles (None is skipped), each with its own undo (the one its ``with`` block
        uses), in the order given: the end-of-notebook tidy-up. Goes on past a failure and raises the
        first one at the end."""
        first = None
        for h in handles:
            if h is None:
                continue
            try:
                h._undo()
            except LabkitError as exc:
                first = first or exc
        if first is not None:
            raise first

    def daemon(self):
        """labkit's daemon on the target, started when it does not run (Docker's Engine API on its socket):
        ``with lab.daemon() as d:`` ... ``d.socket``, ``d.docker_host``, ``d.api(method, path)``,
        ``d.requests()``; the ``with`` stops it again when it started it."""
        from .handles import Daemon
        return Daemon(self, self.call("daemon.start"))

    def volume(self, name):
        """`docker volume create NAME`: a named volume (made anyway by the first container given ``NAME:/path``)."""
        return Record(self.call("volume.create", name=name))

    def volumes(self):
        """`docker volume ls`: rows {name, driver, mountpoint, used_by}."""
        return self.call("volume.ls")

    def volume_rm(self, name, force=False):
        """`docker volume rm NAME`: refused while a container made with it exists (``force``: all the same)."""
        return Record(self.call("volume.rm", name=name, force=bool(force)))

    def registry(self, port=5000):
        """A registry on the target's 127.0.0.1:``port`` (Debian's docker-registry), started when none answers
        there: ``with lab.registry() as reg:`` ... ``lab.tag(img, f"{reg.url}/me/web:v1")``, ``lab.push(...)``,
        ``reg.catalog()``; the ``with`` stops it again (and removes what was pushed) when it started it."""
        from .handles import Registry
        return Registry(self, self.call("registry.start", port=port))

    def cleanup(self, dry_run=False):
        """Remove every kernel object labkit made on the target (and nothing else)."""
        return Record(self.call("cleanup", dry_run=dry_run))


__all__ = ["connect", "Lab", "Rootfs", "Process", "Cgroup", "OverlayRoot", "Network", "Container", "NAMESPACES", "PrivilegeError"]
