"""Named volumes: data that outlives its containers, as ``docker volume`` and ``docker run -v NAME:/path`` keep it.

A volume is a directory of labkit's own, /var/lib/labkit/volumes/NAME/_data (Docker's layout), made on first
use or by :func:`create`, bound into each container that names it. A container's writable layer goes with
``rm``; a volume stays until :func:`remove`, which refuses while any container (running or not) was made with
it, as Docker does. ``labkit cleanup`` removes every volume after the containers. Standard library only.
"""
import os
import shutil

from ..wire.errors import Conflict, InvalidSpec, NotFound
from ..wire.specs import CONTAINERS_DIR, STATE_DIR, VOLUME_NAME as NAME
from .runner import Recorder
from .state import private_dir, read_json

VOLUMES = f"{STATE_DIR}/volumes"


def check_volume_name(name):
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidSpec(f"{name!r} is not a volume name",
                          fix="letters, digits, '_', '.' and '-', starting with a letter or digit, e.g. notes")
    return name


def mountpoint(name):
    return f"{VOLUMES}/{check_volume_name(name)}/_data"


def create(name, rec=None):
    """`docker volume create NAME`: its directory (nothing happens when it exists). Returns its row."""
    rec = rec or Recorder(f"create volume {name}")
    path = mountpoint(name)
    private_dir(VOLUMES)
    private_dir(os.path.dirname(path))
    if not os.path.isdir(path):
        os.mkdir(path, 0o755)  # (the volume's root, as the container sees it: world-readable, root's)
        rec.file("mkdir", path)
    return rec.to_dict(**_row(name))


def _users():
    """{volume mount point: [container names]} of every container's config."""
    out = {}
    try:
        ids = os.listdir(CONTAINERS_DIR)
    except OSError:
        return out
    for cid in ids:
        cfg = read_json(f"{CONTAINERS_DIR}/{cid}/config.json", default=None)
        if isinstance(cfg, dict):
            for b in cfg.get("binds") or ():
                if isinstance(b, list) and b and isinstance(b[0], str) and b[0].startswith(VOLUMES + "/"):
                    out.setdefault(b[0], []).append(str(cfg.get("name")))
    return out


def _row(name, users=None):
    path = mountpoint(name)
    if not os.path.isdir(path) or os.path.islink(os.path.dirname(path)):
        raise NotFound(f"no such volume: {name}", fix=f"create it: labkit volume create {name} (or run -v {name}:/path)")
    used = (users if users is not None else _users()).get(path, [])
    return {"name": name, "driver": "local", "mountpoint": path, "used_by": sorted(used)}


def inspect(name):
    """`docker volume inspect NAME`: {'name', 'driver', 'mountpoint', 'used_by', 'files'}; ``files``: what its top
    level holds, [{name, kind ('file', 'dir', 'symlink' or 'other'), size}] (at most 100, never followed: a
    container may have left a link to anywhere)."""
    import heapq
    import stat
    row = _row(name)
    files = []
    with os.scandir(row["mountpoint"]) as it:
        for entry in heapq.nsmallest(100, it, key=lambda e: e.name):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # gone meanwhile (a container may still be writing there)
                continue
            kind = ("symlink" if stat.S_ISLNK(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                    else "dir" if stat.S_ISDIR(st.st_mode) else "other")
            files.append({"name": entry.name, "kind": kind, "size": st.st_size})
    return dict(row, files=files)


def list_volumes():
    """`docker volume ls`: a row per volume."""
    try:
        names = sorted(n for n in os.listdir(VOLUMES) if NAME.fullmatch(n))
    except OSError:
        return []
    users = _users()
    rows = []
    for n in names:
        try:
            rows.append(_row(n, users))
        except NotFound:
            continue
    return rows


def remove(name, force=False, rec=None):
    """`docker volume rm NAME`: refused while a container made with it exists (``force`` removes it all the same,
    as the containers' data goes too). What the containers wrote there is gone."""
    rec = rec or Recorder(f"remove volume {name}")
    row = _row(name)
    if row["used_by"] and not force:
        raise Conflict(f"volume {name} is in use by container(s) {', '.join(row['used_by'])}",
                       fix=f"remove those containers first (labkit rm {row['used_by'][0]}), then the volume")
    shutil.rmtree(os.path.dirname(row["mountpoint"]))
    rec.file("rmtree", os.path.dirname(row["mountpoint"]))
    return rec.to_dict(name=name)


def cleanup(rec):
    """Every volume (labkit cleanup, after the containers): their names."""
    gone = []
    for row in list_volumes():
        remove(row["name"], force=True, rec=rec)
        gone.append(row["name"])
    return gone


def resolve(binds, rec=None):
    """A container's binds with each volume name (a source without '/') replaced by its directory, made when it
    does not exist yet (as `docker run -v NAME:/path` makes it)."""
    out = []
    for src, dst, ro in binds:
        if not src.startswith("/"):
            create(src, rec)
            src = mountpoint(src)
        out.append((src, dst, ro))
    return tuple(out)
