"""The agent's request loop: one JSON line in, one JSON line out (see :mod:`labkit.protocol`).

``METHODS`` is the whole privileged surface the client can reach; each entry takes keyword
parameters and returns plain JSON data. ``handle(request)`` never raises: every failure becomes a
typed error answer. ``serve(infile, outfile)`` is what ``python3 -m labkit.agent`` runs over stdin and
stdout (or an SSH channel). Standard library only.
"""
import os
import platform
import sys
import traceback

from .. import protocol
from ..errors import InvalidSpec, LabkitError, PrivilegeError, UnsupportedHost
from ..specs import RootfsSpec
from . import bench, cgroups, cleanup, doctor, engine, images, namespaces, network, process, registry, rootfs, vm, workloads
from .runner import read_text, run as run_cmd


def _hello():
    return {"hello": protocol.HELLO, "protocol": protocol.PROTOCOL, "version": protocol.VERSION,
            "python": platform.python_version(), "euid": os.geteuid() if hasattr(os, "geteuid") else None,
            "pid": os.getpid(), "machine": platform.machine(), "system": platform.system()}


def m_run(argv, timeout=60, input=None, check=False):
    """Run a command on the target as root (the host namespaces), e.g. ['uname', '-r']."""
    return run_cmd(argv, timeout=timeout, input=input, check=check).to_dict()


def m_read_file(path, limit=1 << 20):
    """Read a text file on the target (for checks): {'exists', 'text'}."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidSpec(f"path {path!r} must be absolute", fix="e.g. '/proc/self/mountinfo'")
    text = read_text(path)
    return {"path": path, "exists": text is not None, "text": (text or "")[:limit]}


def m_list_dir(path):
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidSpec(f"path {path!r} must be absolute", fix="e.g. '/var/lib/labkit/rootfs/demo'")
    try:
        return {"path": path, "exists": True, "entries": sorted(os.listdir(path))}
    except FileNotFoundError:
        return {"path": path, "exists": False, "entries": []}


def m_host_ns():
    """The namespaces the agent runs in: the host's own."""
    return namespaces.inodes()


METHODS = {
    "hello": _hello,
    "doctor": doctor.doctor,
    "run": m_run,
    "read_file": m_read_file,
    "list_dir": m_list_dir,
    "host_ns": m_host_ns,
    "rootfs.create": lambda name, image="busybox", hostname="labkit", replace=False:
        rootfs.create(RootfsSpec(name=name, image=image, hostname=hostname), replace=replace),
    "rootfs.info": rootfs.info,
    "rootfs.list": rootfs.list_rootfs,
    "rootfs.remove": rootfs.remove,
    "proc.run": process.run,
    "proc.start": process.start,
    "proc.stop": process.stop,
    "proc.list": process.list_processes,
    "proc.inspect": process.inspect,
    "proc.exec": process.exec_in,
    "cgroup.create": lambda spec_dict: cgroups.create(spec_dict),
    "cgroup.stats": cgroups.stats,
    "cgroup.sample": cgroups.sample,
    "cgroup.kill": lambda name: cgroups.kill(name).to_dict(),
    "cgroup.remove": cgroups.remove,
    "cgroup.list": cgroups.list_groups,
    "cgroup.detect": cgroups.detect,
    "image.list": images.list_images,
    "image.inspect": lambda ref: images.load_image(ref),
    "image.build": images.build,
    "image.commit": images.commit,
    "image.tag": images.tag,
    "image.rmi": images.rmi,
    "image.export": images.export_oci,
    "image.import": images.import_oci,
    "image.busybox": images.ensure_busybox,
    "image.prune": images.prune,
    "overlay.create": images.create_container_root,
    "overlay.changes": images.upper_changes,
    "overlay.remove": images.drop_container_root,
    "net.create": network.create,
    "net.remove": network.remove,
    "net.inspect": network.inspect,
    "net.list": network.list_networks,
    "net.topology": network.topology,
    "container.create": engine.create,
    "container.start": engine.start,
    "container.stop": engine.stop,
    "container.wait": engine.wait,
    "container.rm": engine.rm,
    "container.ps": engine.ps,
    "container.logs": engine.logs,
    "container.top": engine.top,
    "container.inspect": engine.inspect,
    "container.exec": engine.exec_in,
    "container.rmi": engine.rmi,
    "image.pull": registry.pull,
    "image.push": registry.push,
    "image.search": registry.search,
    "vm.missing": vm.missing,
    "vm.boot": vm.boot,
    "vm.start": vm.m_start,
    "vm.exec": vm.m_exec,
    "vm.footprint": vm.m_footprint,
    "vm.stop": vm.m_stop,
    "vm.list": vm.list_vms,
    "probe.context": workloads.probe_context,
    "bench.environment": bench.environment,
    "bench.native": bench.native,
    "bench.container": bench.container,
    "bench.vm": bench.in_vm,
    "bench.net_serve": bench.net_serve,
    "bench.net_measure": bench.net_measure,
    "bench.startup_prepare": bench.startup_prepare,
    "bench.startup_sample": bench.startup_sample,
    "bench.startup_finish": bench.startup_finish,
    "bench.mem_available": bench.mem_available_kb,
    "bench.container_footprint": bench.container_footprint,
    "bench.vm_footprint": bench.vm_footprint,
    "probe.done": workloads.probe_done,
    "cleanup": cleanup.cleanup,
    "cleanup.plan": lambda: [list(i) for i in cleanup.plan()],
}


def _precheck():
    if platform.system() != "Linux":
        raise UnsupportedHost(f"the labkit agent needs Linux; this is {platform.system()}")
    if os.geteuid() != 0:
        raise PrivilegeError(f"the labkit agent runs as uid {os.geteuid()}, not root")


def handle(request):
    """Answer one request dict with a response dict. Never raises."""
    req_id = request.get("id") if isinstance(request, dict) else None
    try:
        method = request.get("method")
        params = request.get("params") or {}
        if method not in METHODS:
            raise InvalidSpec(f"the agent has no method {method!r}",
                              fix="the client and agent versions differ; update labkit on the target")
        if not isinstance(params, dict):
            raise InvalidSpec("params must be an object")
        if method != "hello":
            _precheck()
        try:
            result = METHODS[method](**params)
        except TypeError as exc:
            if "argument" in str(exc) and exc.__traceback__ and exc.__traceback__.tb_next is None:
                raise InvalidSpec(f"{method}: {exc}", fix="check the parameter names") from None
            raise
        return protocol.response(req_id, result=result)
    except LabkitError as exc:
        return protocol.response(req_id, error=exc.to_wire())
    except Exception as exc:  # noqa: BLE001 - the loop must survive and say what broke
        tb = traceback.format_exc(limit=6)
        return protocol.response(req_id, error={
            "type": "LabkitError", "message": f"agent bug: {type(exc).__name__}: {exc}",
            "fix": "report it with this traceback:\n" + tb, "details": {}})


def serve(infile, outfile):
    """Speak the protocol over binary file objects until EOF."""
    outfile.write(protocol.encode(_hello()))
    outfile.flush()
    for line in infile:
        if not line.strip():
            continue
        try:
            request = protocol.decode(line)
        except LabkitError as exc:
            answer = protocol.response(None, error=exc.to_wire())
        else:
            answer = handle(request)
        outfile.write(protocol.encode(answer))
        outfile.flush()


def main():
    # Keep the protocol channel private: anything a child prints goes to stderr, not into the stream.
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.umask(0o022)
    serve(sys.stdin.buffer, proto_out)
    return 0
