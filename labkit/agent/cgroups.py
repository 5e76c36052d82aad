"""cgroups: which hierarchy this host has (v1, v2 or hybrid) and where each controller lives.

Detection only reads /proc/self/mountinfo and the cgroup files; nothing is assumed. Limits and
readouts come with the cgroups lab; every group labkit makes lives below a ``labkit`` parent in
each hierarchy (:data:`PARENT`), which is what ``labkit cleanup`` removes. Standard library only.
"""
import os

from .runner import read_text

PARENT = "labkit"


def hierarchies(mountinfo=None, read=read_text):
    """[(mount point, fstype, [controllers])] for every cgroup mount of this mount namespace.

    ``mountinfo`` (text) and ``read`` (path -> text) default to the live system; tests pass other hosts'.
    """
    out = []
    text = mountinfo if mountinfo is not None else read_text("/proc/self/mountinfo")
    for line in (text or "").splitlines():
        pre, _, post = line.partition(" - ")
        fields, post = pre.split(), post.split()
        if not post or post[0] not in ("cgroup", "cgroup2"):
            continue
        mp = fields[4]
        if post[0] == "cgroup2":
            ctrls = (read(os.path.join(mp, "cgroup.controllers")) or "").split()
        else:
            opts = post[2].split(",") if len(post) > 2 else []
            ctrls = [o for o in opts if o not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec",
                                                  "clone_children", "nsdelegate", "memory_recursiveprot")
                     and not o.startswith("release_agent") and not o.startswith("name=")]
            ctrls += [o for o in opts if o.startswith("name=")]
        out.append((mp, post[0], ctrls))
    return out


def detect(mountinfo=None, read=read_text):
    """{'mode': 'v2'|'v1'|'hybrid'|'none', 'v2_mount', 'v2_controllers', 'v1': {controller: mount}}."""
    v1, v2_mount, v2_ctrls = {}, None, []
    for mp, fstype, ctrls in hierarchies(mountinfo, read):
        if fstype == "cgroup2":
            if v2_mount is None or mp == "/sys/fs/cgroup":
                v2_mount, v2_ctrls = mp, ctrls
        else:
            for c in ctrls:
                v1.setdefault(c, mp)
    real_v1 = {c: m for c, m in v1.items() if not c.startswith("name=")}
    if v2_mount and not real_v1:
        mode = "v2"
    elif v2_mount and real_v1:
        mode = "hybrid"
    elif real_v1:
        mode = "v1"
    else:
        mode = "none"
    return {"mode": mode, "v2_mount": v2_mount, "v2_controllers": v2_ctrls, "v1": v1}


def labkit_groups():
    """Every directory below a ``labkit`` parent in every hierarchy, deepest first."""
    roots = set()
    for mp, _, _ in hierarchies():
        roots.add(os.path.join(mp, PARENT))
    found = []
    for r in sorted(roots):
        if not os.path.isdir(r):
            continue
        for dirpath, dirnames, _ in os.walk(r):
            for d in dirnames:
                found.append(os.path.join(dirpath, d))
    return sorted(found, key=lambda p: -p.count("/")), sorted(r for r in roots if os.path.isdir(r))
