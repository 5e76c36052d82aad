"""Namespaces: which ones a process is in, what it shares with the host, and what it can see.

A process's namespaces are the inodes behind /proc/<pid>/ns/*: two processes share a namespace exactly
when those inodes are equal. ``host_context`` takes the host's side (before any fork), ``look_around``
is run by the new process itself, from inside, just before it execs, so the record holds the
process's *own* view. ``write_id_maps`` gives a new user namespace its uid/gid maps (from the parent,
which still holds the host's privileges). unshare(2) itself is in :mod:`labkit.agent.kernel`.
Standard library only.
"""
import os
import socket

from ..wire.specs import NAMESPACES
from . import kernel
from .runner import pid_starttime, read_text


def inodes(pid="self"):
    """{namespace: inode} of a process (default: the caller)."""
    return {n: kernel.ns_inode(pid, n) for n in NAMESPACES}


def shares(ns, host_ns):
    """{namespace: True when ``ns`` is the host's} for every namespace labkit knows."""
    return {n: (ns or {}).get(n) == (host_ns or {}).get(n) for n in NAMESPACES}


def clone_flags(names):
    flags = 0
    for n in names:
        flags |= kernel.NS_FLAGS[n]
    return flags


def mount_ids(text):
    return {int(line.split()[0]) for line in (text or "").splitlines() if line.strip()}



def host_context(marker_path):
    """Facts about the host that the process's view is compared against (taken by P before fork)."""
    return {"init_starttime": pid_starttime(1), "mount_ids": sorted(mount_ids(read_text("/proc/self/mountinfo"))),
            "hostname": os.uname().nodename, "links": sorted(n for _, n in socket.if_nameindex()),
            "marker": marker_path, "marker_token": read_text(marker_path, "").strip() if marker_path else "",
            "ns": inodes(), "kernel": os.uname().release}



def look_around(ctx):
    """What this process can see from where it is now: its own view, compared with the host's."""
    view = {"pid": os.getpid(), "hostname": os.uname().nodename, "kernel": os.uname().release,
            "uid": os.getuid(), "root_listing": sorted(os.listdir("/"))[:40]}
    have_proc = os.path.exists("/proc/self/stat")
    view["proc"] = have_proc
    if have_proc:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
        view["pids_visible"] = len(pids)
        view["host_pids_visible"] = pid_starttime(1) == ctx["init_starttime"]
        ids = mount_ids(read_text("/proc/self/mountinfo"))
        view["mounts"] = len(ids)
        view["host_mounts_visible"] = bool(ids & set(ctx["mount_ids"]))
        uid_map = " ".join((read_text("/proc/self/uid_map") or "").split())
        view["uid_map"] = uid_map
        view["root_is_host_root"] = uid_map.startswith("0 0 ")
        view["cgroup"] = (read_text("/proc/self/cgroup") or "").strip().splitlines()[-1:]
    else:
        view["pids_visible"] = None
        view["host_pids_visible"] = None
        view["mounts"] = None
        view["host_mounts_visible"] = None
        view["uid_map"] = None
        view["root_is_host_root"] = None
    try:
        view["links"] = sorted(n for _, n in socket.if_nameindex())
    except OSError:
        view["links"] = []
    view["host_links_visible"] = bool(set(view["links"]) - {"lo"}) and set(view["links"]) == set(ctx["links"])
    view["hostname_is_host"] = view["hostname"] == ctx["hostname"]
    marker = ctx.get("marker")
    view["host_files_visible"] = bool(marker) and (read_text(marker, "") or "").strip() == ctx["marker_token"]
    return view



def write_id_maps(pid, spec, rec):
    text = "".join(f"{i} {o} {n}\n" for i, o, n in spec.id_map)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)
        rec.file("write", f"/proc/{pid}/{name}", text.strip())
