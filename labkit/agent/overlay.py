"""overlayfs: a container's root as read-only image layers under one writable upper directory.

``mount_root(lowers, upper, work, merged)`` stacks the layers (first = top) with the kernel's overlay
filesystem; writes land in ``upper`` (a file from a lower layer is *copied up* first), deletions
become *whiteouts* there (a 0/0 character device), and a directory deleted and made again becomes
*opaque* (the ``trusted.overlay.opaque`` xattr), hiding what the layers below had. ``inspect_upper``
lists exactly those on disk. Mount points live below /var/lib/labkit, so cleanup finds them.
Standard library only.
"""
import os
import stat

from ..wire.errors import MechanismError
from . import kernel
from .tarsafe import OPAQUE_XATTR


def mount_root(lowers, upper, work, merged, rec):
    if not lowers:
        raise MechanismError("an overlay needs at least one lower layer")
    for d in (upper, work, merged):
        os.makedirs(d, exist_ok=True)
    data = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
    if len(data) > 4000:
        raise MechanismError(f"{len(lowers)} layers make an overlay option string of {len(data)} bytes, "
                             "more than a page", fix="squash the image into fewer layers")
    kernel.mount("overlay", merged, "overlay", 0, data, rec=rec)
    return merged


def unmount(merged, rec):
    kernel.umount2(merged, kernel.MNT_DETACH, rec=rec)


def inspect_upper(upper, limit=200):
    """What a container changed, as overlayfs stores it: files, dirs, whiteouts, opaque dirs."""
    out = []
    for dirpath, dirnames, filenames in os.walk(upper):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, upper)
            st = os.lstat(full)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                kind = "whiteout (deleted)"
            elif stat.S_ISDIR(st.st_mode):
                try:
                    opaque = os.getxattr(full, OPAQUE_XATTR, follow_symlinks=False) == b"y"
                except OSError:
                    opaque = False
                kind = "opaque dir (replaces the layers' dir)" if opaque else "dir"
            elif stat.S_ISLNK(st.st_mode):
                kind = "symlink"
            else:
                kind = "file"
            out.append({"path": rel, "kind": kind, "size": st.st_size if stat.S_ISREG(st.st_mode) else None})
            if len(out) >= limit:
                return out
    return out
