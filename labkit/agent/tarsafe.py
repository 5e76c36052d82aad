"""Unpacking untrusted layer tars, and packing overlay upper directories as OCI layers.

``unpack(blob, dest, digest)`` verifies the blob's sha256 *before* anything is written, then unpacks
into a fresh directory that is renamed to ``dest`` only when every entry passed: no absolute names, no
``..``, no entry that goes through a symlink, no hard link to outside the layer or to an entry not yet
unpacked, no symlink whose target climbs out of the root, no device nodes. Each refusal names the bad
entry, and a refused layer leaves nothing on disk. OCI whiteouts (``.wh.name``, ``.wh..wh..opq``) become
what overlayfs understands (a 0/0 character device, the ``trusted.overlay.opaque`` xattr).

``pack(upper, out)`` does the reverse for a container's upper directory (commit, build).
Standard library only.
"""
import hashlib
import io
import os
import posixpath
import shutil
import stat
import tarfile

from ..errors import InvalidSpec, UnsafeLayer

WH = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _clean_name(name):
    """The member's path relative to the root, or raise."""
    if name.startswith("/"):
        raise UnsafeLayer(f"entry {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"entry {name!r} climbs out of the layer with '..'")
    if not parts:
        return ""
    return "/".join(parts)


def _symlink_escapes(member_rel, target):
    """True when a symlink at member_rel pointing to target would resolve outside the root.

    Absolute targets are taken inside the container's root (that is how the container sees them)."""
    if target.startswith("/"):
        base, rel = "", target.lstrip("/")
    else:
        base, rel = posixpath.dirname(member_rel), target
    depth = [p for p in base.split("/") if p]
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not depth:
                return True
            depth.pop()
        else:
            depth.append(part)
    return False


def _no_symlink_parents(root, rel):
    """Refuse to write below a symlink (that is how a later entry reaches outside the root)."""
    cur = root
    for part in rel.split("/")[:-1]:
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            raise UnsafeLayer(f"entry {rel!r} would be written through the symlink {part!r}")


def unpack(blob, dest, digest=None, allow_devices=False):
    """Verify and unpack a layer tar; returns a list of (kind, path) for whiteouts and opaque dirs."""
    if digest is not None:
        got = sha256_file(blob)
        if got != digest:
            raise UnsafeLayer(f"layer digest mismatch: expected {digest}, the blob is {got}",
                              fix="the registry or file lied about the content: fetch it again or do not use it")
    if os.path.lexists(dest):
        raise InvalidSpec(f"{dest} exists already", fix="layers are immutable: unpack each one once")
    tmp = dest + ".unpacking"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    special = []
    try:
        with tarfile.open(blob, "r:*") as tar:
            seen = set()
            for m in tar:
                rel = _clean_name(m.name)
                if not rel:
                    continue
                _no_symlink_parents(tmp, rel)
                path = os.path.join(tmp, rel)
                base = posixpath.basename(rel)
                parent = os.path.dirname(path)
                if base == OPAQUE:
                    os.makedirs(parent, exist_ok=True)
                    os.setxattr(parent, OPAQUE_XATTR, b"y")
                    special.append(("opaque", posixpath.dirname(rel) or "/"))
                    continue
                if base.startswith(WH):
                    target = os.path.join(parent, base[len(WH):])
                    os.makedirs(parent, exist_ok=True)
                    os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                    special.append(("whiteout", posixpath.join(posixpath.dirname(rel), base[len(WH):])))
                    continue
                if m.isdev() and not allow_devices:
                    raise UnsafeLayer(f"entry {rel!r} is a device node ({'char' if m.ischr() else 'block'} "
                                      f"{m.devmajor}:{m.devminor}); layers may not create devices")
                if m.issym() and _symlink_escapes(rel, m.linkname):
                    raise UnsafeLayer(f"symlink {rel!r} -> {m.linkname!r} points outside the root")
                if m.islnk():
                    link = _clean_name(m.linkname)
                    if link not in seen:
                        raise UnsafeLayer(f"hard link {rel!r} -> {m.linkname!r} points outside the layer "
                                          "(or to an entry that is not in it)")
                    _no_symlink_parents(tmp, link)
                    if os.path.islink(os.path.join(tmp, link)):
                        raise UnsafeLayer(f"hard link {rel!r} -> {m.linkname!r} targets a symlink")
                os.makedirs(parent, exist_ok=True)
                if os.path.lexists(path) and not (m.isdir() and os.path.isdir(path)):
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                if m.isdir():
                    os.makedirs(path, exist_ok=True)
                    os.chmod(path, m.mode & 0o7777)
                elif m.isreg():
                    with tar.extractfile(m) as src, open(path, "xb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.chmod(path, m.mode & 0o7777)
                elif m.issym():
                    os.symlink(m.linkname, path)
                elif m.islnk():
                    os.link(os.path.join(tmp, _clean_name(m.linkname)), path)
                elif m.isfifo():
                    os.mkfifo(path, m.mode & 0o777)
                elif m.isdev():
                    kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                    os.mknod(path, kind | (m.mode & 0o777), os.makedev(m.devmajor, m.devminor))
                else:
                    raise UnsafeLayer(f"entry {rel!r} has an unknown type {m.type!r}")
                os.lchown(path, m.uid, m.gid)
                if not m.issym():
                    os.utime(path, (m.mtime, m.mtime))
                seen.add(rel)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return special


def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def _is_opaque(path):
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def pack(upper, out):
    """Write ``upper`` (an overlay upper dir, or any root) as an OCI layer tar; returns (digest, entries).

    Deterministic: sorted names, mtimes kept, no user names, so the same tree gives the same digest."""
    entries = []
    with open(out, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(info, fileobj=None):
            info.uname = info.gname = ""
            tar.addfile(info, fileobj)

        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, upper)
            rel_dir = "" if rel_dir == "." else rel_dir
            if rel_dir and _is_opaque(dirpath):
                add(tarfile.TarInfo(posixpath.join(rel_dir, OPAQUE)))
                entries.append(("opaque", rel_dir))
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = posixpath.join(rel_dir, name) if rel_dir else name
                st = os.lstat(full)
                if _is_whiteout(st):
                    info = tarfile.TarInfo(posixpath.join(rel_dir, WH + name) if rel_dir else WH + name)
                    info.mtime = int(st.st_mtime)
                    add(info)
                    entries.append(("whiteout", rel))
                    continue
                info = tar.gettarinfo(full, arcname=rel)
                if info.isreg():
                    with open(full, "rb") as src:
                        add(info, src)
                else:
                    add(info)
                entries.append(("file" if info.isreg() else "dir" if info.isdir() else
                                "symlink" if info.issym() else "other", rel))
    return sha256_file(out), entries


def tar_bytes(files):
    """A tar (bytes) from {name: bytes or (bytes, mode)} -- for tests and small contexts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            mode = 0o644
            if isinstance(data, tuple):
                data, mode = data
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
