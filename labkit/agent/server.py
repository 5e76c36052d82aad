"""The agent's request loop: one JSON line in, one JSON line out (see :mod:`labkit.wire.protocol`).

``METHODS`` is the whole privileged surface the client can reach; each entry takes keyword
parameters and returns plain JSON data. ``handle(request)`` never raises: every failure becomes a
typed error answer. ``serve(infile, outfile)`` is what ``python3 -m labkit.agent`` runs over stdin and
stdout (or an SSH channel). Standard library only.
"""
import os
import platform
import stat
import sys
import traceback

from ..wire import protocol
from ..wire.errors import InvalidSpec, LabkitError, PrivilegeError, UnsupportedHost
from ..wire.orchestration import ServiceSpec, StackSpec
from ..wire.specs import CgroupSpec, ClusterSpec, ContainerSpec, NetworkSpec, NodeSpec, ProcessSpec, RootfsSpec
from . import (build, cgroups, cleanup, cluster, daemon, doctor, engine, localregistry, machine, manager, measure, namespaces,
               network, node, oci, process, registry, roots, rootfs, store, vm, vmsandbox, volumes, workloads)
from .runner import run as run_cmd


def _hello():
    return {"hello": protocol.HELLO, "protocol": protocol.PROTOCOL, "version": protocol.VERSION,
            "python": platform.python_version(), "euid": os.geteuid() if hasattr(os, "geteuid") else None,
            "pid": os.getpid(), "machine": platform.machine(), "system": platform.system()}


def m_run(argv, timeout=60, input=None, check=False):
    """Run a command on the target as root (the host namespaces), e.g. ['uname', '-r']."""
    return run_cmd(argv, timeout=timeout, input=input, check=check).to_dict()


#: the most read_file returns in one answer (escaped as JSON it stays well inside protocol.MAX_LINE)
MAX_READ = 8 << 20


def _abs_path(path, example):
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidSpec(f"path {path!r} must be an absolute path", fix=f"e.g. {example!r}")
    return path


def m_read_file(path, limit=1 << 20):
    """Read a text file on the target (for checks): {'path', 'exists', 'text', 'truncated'}.

    At most ``limit`` bytes (1 MiB by default, MAX_READ at most) of a regular file (the files of /proc
    and /sys are regular files); a device, FIFO, socket or directory is refused before anything is read."""
    _abs_path(path, "/proc/self/mountinfo")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_READ:
        raise InvalidSpec(f"read_file limit {limit!r} must be a whole number of bytes from 1 to {MAX_READ}",
                          fix="e.g. limit=65536; read bigger files in pieces with run(['dd', ...]) or copy "
                              "them off the target")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer, nor reading /proc/kmsg for a message
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return {"path": path, "exists": False, "text": "", "truncated": False}
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
                    stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}.get(stat.S_IFMT(mode), "not a file")
            raise InvalidSpec(f"read_file {path!r}: it is {kind}, not a regular file",
                              fix="read_file reads regular files (and /proc and /sys entries); list a directory "
                                  "with list_dir, read a device with run(['dd', 'if=...', 'bs=4096', 'count=1'])")
        chunks, got = [], 0
        while got <= limit:
            try:
                chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            except BlockingIOError:  # nothing more to read now (e.g. /proc/kmsg): what came is the text
                break
            except OSError:          # a file that cannot be read (some /sys attributes): as before, absent
                return {"path": path, "exists": False, "text": "", "truncated": False}
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return {"path": path, "exists": True, "text": data[:limit].decode("utf-8", "replace"),
            "truncated": len(data) > limit}


def m_list_dir(path):
    _abs_path(path, "/var/lib/labkit/rootfs/demo")
    try:
        return {"path": path, "exists": True, "entries": sorted(os.listdir(path))}
    except FileNotFoundError:
        return {"path": path, "exists": False, "entries": []}


def m_host_ns():
    """The namespaces the agent runs in: the host's own."""
    return namespaces.inodes()


def _decoded(cls, fn):
    """The method for ``fn(spec, **params)``: the request's ``spec`` object decoded into ``cls`` once,
    here (unknown fields refused, every value validated), so agent functions take spec objects."""
    def method(spec, **params):
        return fn(cls.from_dict(spec), **params)
    method.__name__ = getattr(fn, "__name__", "method")
    method.__doc__ = fn.__doc__
    return method


METHODS = {
    "hello": _hello,
    "doctor": doctor.doctor,
    "run": m_run,
    "read_file": m_read_file,
    "list_dir": m_list_dir,
    "host_ns": m_host_ns,
    "rootfs.create": _decoded(RootfsSpec, rootfs.create),
    "rootfs.info": rootfs.info,
    "rootfs.list": rootfs.list_rootfs,
    "rootfs.remove": rootfs.remove,
    "proc.run": _decoded(ProcessSpec, process.run),
    "proc.start": _decoded(ProcessSpec, process.start),
    "proc.stop": process.stop,
    "proc.list": process.list_processes,
    "proc.inspect": process.inspect,
    "proc.exec": process.exec_in,
    "cluster.create": _decoded(ClusterSpec, cluster.create),  # nodes wired as one network (lab 09)
    "cluster.inspect": cluster.inspect,
    "cluster.list": cluster.list_clusters,
    "cluster.remove": cluster.remove,
    "cluster.manage": cluster.manage,      # its control loop, as a process of its own
    "cluster.unmanage": cluster.unmanage,
    "cluster.node_update": cluster.node_update,  # a node's availability: active, pause, drain
    "manager.step": manager.step,          # one turn of the loop, now
    "manager.observe": manager.observe,    # its halves, for a loop of one's own (lab 09)
    "manager.act": manager.act,
    "service.create": lambda name, spec, step=True: manager.service_create(name, ServiceSpec.from_dict(spec), step),
    "service.update": manager.service_update,
    "service.rollback": manager.service_rollback,
    "service.inspect": manager.service_inspect,
    "service.rm": manager.service_rm,
    "service.ls": manager.service_ls,
    "service.ps": manager.service_ps,
    "stack.deploy": lambda name, spec: manager.stack_deploy(name, StackSpec.from_dict(spec)),
    "stack.ls": manager.stack_ls,
    "stack.ps": manager.stack_ps,
    "stack.rm": manager.stack_rm,
    "node.create": _decoded(NodeSpec, node.create),  # a cluster's "machine" on this host (lab 09)
    "node.inspect": node.inspect,
    "node.list": node.list_nodes,
    "node.kill": node.kill,
    "node.call": node.call,
    "node.pause": node.pause,
    "node.resume": node.resume,
    "node.remove": node.remove,
    "machine.hello": machine.hello,     # a worker machine's side of a cluster across VMs (lab 09's option)
    "machine.join": machine.join,
    "machine.mesh": machine.mesh,
    "machine.leave": machine.leave,
    "machine.poweroff": machine.poweroff,
    "machine.image_have": machine.image_have,
    "machine.blob_put": machine.blob_put,
    "machine.image_put": machine.image_put,
    "cgroup.create": _decoded(CgroupSpec, cgroups.create),
    "cgroup.stats": cgroups.stats,
    "cgroup.sample": cgroups.sample,
    "cgroup.kill": lambda name: cgroups.kill(name).to_dict(),
    "cgroup.remove": cgroups.remove,
    "cgroup.list": cgroups.list_groups,
    "cgroup.detect": cgroups.detect,
    "image.list": store.list_images,
    "image.inspect": lambda ref: store.load_image(ref),
    "image.build": build.build,
    "image.commit": roots.commit,
    "image.tag": store.tag,
    "image.rmi": engine.rmi,  # the one route: refused while a container uses the image (-f: a running one)
    "image.export": oci.export_oci,
    "oci.run_bundle": oci.run_bundle,
    "image.import": oci.import_oci,
    "image.busybox": store.ensure_busybox,
    "image.prune": store.prune,
    "overlay.create": roots.create_container_root,
    "overlay.changes": roots.upper_changes,
    "overlay.info": roots.container_root_info,
    "overlay.remove": roots.drop_container_root,
    "net.create": _decoded(NetworkSpec, network.create),
    "net.remove": network.remove,
    "net.inspect": network.inspect,
    "net.list": network.list_networks,
    "net.topology": network.topology,
    "container.create": _decoded(ContainerSpec, engine.create),
    "container.start": engine.start,
    "container.stop": engine.stop,
    "container.wait": engine.wait,
    "container.rm": engine.rm,
    "container.ps": engine.ps,
    "container.logs": engine.logs,
    "container.top": engine.top,
    "container.inspect": engine.inspect,
    "container.exec": engine.exec_in,
    "container.kill": engine.kill,
    "daemon.start": daemon.m_start,
    "daemon.stop": daemon.m_stop,
    "daemon.status": daemon.m_status,
    "image.pull": registry.pull,
    "image.push": registry.push,
    "image.search": registry.search,
    "volume.create": lambda name: volumes.create(name),
    "volume.ls": volumes.list_volumes,
    "volume.inspect": volumes.inspect,
    "volume.rm": lambda name, force=False: volumes.remove(name, force),
    "registry.start": localregistry.start,
    "registry.stop": lambda remove=False: localregistry.stop(remove),
    "registry.status": localregistry.status,
    "registry.get": localregistry.get,
    "vm.missing": vm.missing,
    "vm.boot": vm.boot,
    "vm.start": vm.m_start,
    "vm.foreign": vm.foreign_guest,
    "vm.exec": vm.m_exec,
    "vm.footprint": vm.m_footprint,
    "vm.stop": vm.m_stop,
    "vm.list": vm.list_vms,
    "vm.grading_restore": vmsandbox.restore,
    "vm.grading_stop": vmsandbox.stop,
    "probe.context": workloads.probe_context,
    "bench.environment": measure.environment,
    "bench.native": measure.native,
    "bench.container": measure.container,
    "bench.vm": measure.in_vm,
    "bench.net_serve": measure.net_serve,
    "bench.net_measure": measure.net_measure,
    "bench.startup_prepare": measure.startup_prepare,
    "bench.startup_sample": measure.startup_sample,
    "bench.startup_finish": measure.startup_finish,
    "bench.mem_available": measure.mem_available_kb,
    "bench.container_footprint": measure.container_footprint,
    "bench.vm_footprint": measure.vm_footprint,
    "probe.done": workloads.probe_done,
    "probe.host_disk": workloads.host_disk,
    "probe.setuid_left": workloads.setuid_left,
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
        if not isinstance(method, str) or method not in METHODS:
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


def encode_answer(answer):
    """The answer's line; an answer that cannot go on the wire (too long, nested too deep, not JSON data)
    becomes a ProtocolError answer to the same request, so the client learns why and the loop goes on."""
    try:
        return protocol.encode(answer, sender="agent")
    except LabkitError as exc:
        error = exc.to_wire()
    try:
        return protocol.encode(protocol.response(answer.get("id"), error=error), sender="agent")
    except LabkitError:  # the request's own id is what does not fit: answer as to an unreadable line
        return protocol.encode(protocol.response(None, error=error), sender="agent")


_PIECE = 1 << 20


def _skip_line(infile):
    """Read and drop the rest of an over-long line, a piece at a time; the number of bytes dropped."""
    dropped = 0
    while True:
        piece = infile.readline(_PIECE)
        dropped += len(piece)
        if not piece or piece.endswith(b"\n"):
            return dropped


def read_request(infile):
    """The next request from ``infile``: (request dict or None at EOF, error answer or None).

    Holds at most protocol.MAX_LINE bytes of a line (read a piece at a time); the rest of a longer line
    is read and dropped, and the line answered with a ProtocolError, as is a line that is not JSON or
    nests too deep."""
    while True:
        line = bytearray()
        while True:
            piece = infile.readline(_PIECE)
            line += piece
            if not piece or piece.endswith(b"\n"):
                break
            if len(line) >= protocol.MAX_LINE:
                size = len(line) + _skip_line(infile)
                return None, protocol.response(None, error=protocol.long_error("client", size).to_wire())
        if not line:
            return None, None
        if not line.isspace():
            break
    try:
        return protocol.decode(line, sender="client"), None
    except LabkitError as exc:
        return None, protocol.response(None, error=exc.to_wire())


def serve(infile, outfile):
    """Speak the protocol over binary file objects until EOF; no line the client sends ends the loop."""
    outfile.write(encode_answer(_hello()))
    outfile.flush()
    while True:
        request, answer = read_request(infile)
        if request is None and answer is None:
            return
        if answer is None:
            answer = handle(request)
        outfile.write(encode_answer(answer))
        outfile.flush()


def main():
    # Keep the protocol channel private: anything a child prints goes to stderr, not into the stream.
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.umask(0o022)
    serve(sys.stdin.buffer, proto_out)
    return 0
