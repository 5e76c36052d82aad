"""``labkit cleanup``: remove every kernel object labkit made on this host, and nothing else.

What counts as labkit's (see DESIGN.md, "Naming of kernel objects"): processes recorded in
/run/labkit/procs; processes whose root lies in /var/lib/labkit or /run/labkit; mounts below those two
directories (not a mount at them); network namespaces named ``lk-*``; links of labkit's name families
(:data:`labkit.agent.network.LINK_NAME`); cgroups below a
``labkit`` parent in any hierarchy; the nftables table ``ip labkit`` and iptables chains ``LABKIT-*``
(and the sysctls labkit's networks changed, given back their old values); the grader's scratch directories
``/run/labkit/grade/grade-<slot>-<hex>`` (their sandboxes' cgroups go first); a cluster's nodes recorded in
/run/labkit/nodes and their stores under /var/lib/labkit/nodes (:mod:`labkit.agent.node`), the clusters
recorded in /run/labkit/clusters with their routes (:mod:`labkit.agent.cluster`), and the local registry labkit
started, with what was pushed to it (:mod:`labkit.agent.localregistry`), and named volumes
(:mod:`labkit.agent.volumes`). Each is matched by exact rule, never by a loose pattern, and
removal is idempotent: a second run finds nothing. Standard library only.
"""
import os
import signal
import time

import re
import shutil

from ..wire.specs import GRADE_DIR, RUN_DIR, STATE_DIR
from . import (cgroups, cluster, engine, kernel, localregistry, machine, manager, network, node, process, vm, volumes,
               workloads)
from .rootfs import mounts_under
from .runner import Recorder, read_text, run, which

LABKIT_DIRS = (STATE_DIR, RUN_DIR)


def _in_labkit(path):
    return any(path == d or path.startswith(d + "/") for d in LABKIT_DIRS)


def _mounts():
    """Mount points strictly below labkit's directories (a filesystem mounted at /var/lib/labkit itself is
    the host's way of giving labkit a disk, not labkit's to remove), deepest first."""
    return [mp for d in LABKIT_DIRS for mp in mounts_under(d) if mp != d]


def plan():
    """What cleanup would remove, as (kind, name) pairs. Read-only."""
    items = []
    for c in cluster.list_clusters():
        items.append(("cluster", c["name"]))
    for n in node.list_nodes():
        items.append(("node", n["id"]))
    for name in machine.memberships():  # (on a worker machine: what its cluster made here)
        items.append(("cluster membership", name))
    for fn in machine.incoming():  # (a layer a cluster's manager began to send here)
        items.append(("unfinished upload", fn))
    for e in process.list_processes():
        items.append(("process", e["id"]))
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                root = os.readlink(f"/proc/{p}/root")
            except OSError:
                continue
            if _in_labkit(root):
                items.append(("process-root", p))
    for mp in _mounts():
        items.append(("mount", mp))
    if os.path.isdir("/run/netns"):
        for n in sorted(os.listdir("/run/netns")):
            if n.startswith("lk-"):
                items.append(("netns", n))
    for _, name in _links():
        items.append(("link", name))
    groups, _ = cgroups.labkit_groups()
    for g in groups:
        items.append(("cgroup", g))
    for st in vm.list_vms():
        items.append(("vm", st["id"]))
    for st in network.list_networks():
        items.append(("network", st["spec"]["name"]))
    for fw in network.firewall_leftovers():
        items.append(("firewall", fw))
    for table in manager.mesh_leftovers():
        items.append(("firewall", f"nft table ip {table}"))
    for d in _scratch_dirs():
        items.append(("grading scratch", d))
    items += [("volume", v["name"]) for v in volumes.list_volumes()]
    items += localregistry.plan()
    items += [("probe marker", m) for m in workloads.leftover_probes()]  # (with its System V segment)
    return items


_SCRATCH = re.compile(r"grade-\d+-[0-9a-f]{6}")


def _scratch_dirs():
    try:
        return sorted(os.path.join(GRADE_DIR, n) for n in os.listdir(GRADE_DIR) if _SCRATCH.fullmatch(n))
    except OSError:
        return []


def _links():
    try:
        import socket
        return [(i, n) for i, n in socket.if_nameindex() if network.is_labkit_link(n)]
    except OSError:
        return []


def cleanup(dry_run=False):
    rec = Recorder("labkit cleanup" + (" (dry run)" if dry_run else ""))
    items = plan()
    rec.fact("found", [f"{k} {n}" for k, n in items])
    if dry_run:
        return rec.to_dict(removed=[])
    removed = []
    removed += vm.cleanup(rec)  # qemu first: a VM's tap is on a labkit bridge
    cluster.cleanup(rec)  # clusters next: with each, its manager, nodes and all they ran, routes, mesh, network
    node.cleanup(rec)
    machine.cleanup(rec)
    removed += [f"{k} {n}" for k, n in items if k in ("cluster membership", "unfinished upload")]
    for table in manager.mesh_leftovers():  # a cluster's whose record was lost
        rec.run(["nft", "delete", "table", "ip", table])
    removed += [f"{k} {n}" for k, n in items if k in ("cluster", "node")]
    localregistry.cleanup(rec)
    for m in workloads.leftover_probes():
        workloads.probe_done(m)
        removed.append(f"probe marker {m}")
    removed += [f"{k} {n}" for k, n in items if k in ("registry", "registry storage")]
    engine.cleanup(rec)  # monitors and containers first: their roots, cgroups and veths follow below
    removed += [f"volume {n}" for n in volumes.cleanup(rec)]  # (their containers are gone: nothing binds them now)
    for e in process.list_processes():
        process.stop(e["id"], timeout=2)
        removed.append(f"process {e['id']}")
    for kind, pid in items:
        if kind == "process-root":
            try:  # still a process rooted in labkit's directories (not a pid recycled since plan())?
                if not _in_labkit(os.readlink(f"/proc/{pid}/root")):
                    continue
                os.kill(int(pid), signal.SIGKILL)
                removed.append(f"process {pid}")
            except (ProcessLookupError, FileNotFoundError):
                pass
    if removed:
        time.sleep(0.05)  # let the killed processes release their mounts
    for mp in _mounts():
        try:
            kernel.umount2(mp, kernel.MNT_DETACH, rec=rec)
            removed.append(f"mount {mp}")
        except Exception:  # noqa: BLE001 - keep going, report what is left
            pass
    if os.path.isdir("/run/netns") and which("ip"):
        for n in sorted(os.listdir("/run/netns")):
            if n.startswith("lk-"):
                if run(["ip", "netns", "delete", n], recorder=rec, check=False).ok:
                    removed.append(f"netns {n}")
    for _, name in _links():
        if which("ip") and run(["ip", "link", "delete", name], recorder=rec, check=False).ok:
            removed.append(f"link {name}")
    had_net = [f"network {st['spec']['name']}" for st in network.list_networks()] + \
        [f"firewall {fw}" for fw in network.firewall_leftovers()]
    network.cleanup(rec)
    removed += had_net
    groups, parents = cgroups.labkit_groups()
    for g in groups + parents:
        _empty_cgroup(g)
        try:
            os.rmdir(g)
            rec.file("rmdir", g)
            if g in groups:
                removed.append(f"cgroup {g}")
        except OSError:
            pass
    for d in _scratch_dirs():  # their sandboxes died with the cgroups above
        shutil.rmtree(d, ignore_errors=True)
        if not os.path.lexists(d):
            removed.append(f"grading scratch {d}")
    left = plan()
    rec.fact("left", [f"{k} {n}" for k, n in left])
    return rec.to_dict(removed=removed)


def _empty_cgroup(path):
    procs = (read_text(os.path.join(path, "cgroup.procs")) or "").split()
    for p in procs:
        try:
            os.kill(int(p), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    if procs:
        end = time.monotonic() + 2
        while time.monotonic() < end and (read_text(os.path.join(path, "cgroup.procs")) or "").strip():
            time.sleep(0.02)
