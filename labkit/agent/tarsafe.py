"""Unpacking untrusted layer tars, and packing overlay upper directories as OCI layers.

``unpack(blob, dest, digest)`` verifies the blob's sha256 *before* anything is written, then unpacks
into a fresh directory that is renamed to ``dest`` only when every entry passed: no absolute names, no
``..``, no entry that goes through a symlink, no hard link to outside the layer or to an entry not yet
unpacked, no symlink whose target climbs out of the root. Every write, chmod, chown and utime acts on the
entry itself (directory file descriptors, O_NOFOLLOW), never through a link. Device nodes are left out and
reported (a container's /dev is made at start). Each refusal names the bad entry, and a refused layer
leaves nothing on disk. OCI whiteouts (``.wh.name``, ``.wh..wh..opq``) become
what overlayfs understands (a 0/0 character device, the ``trusted.overlay.opaque`` xattr).

``pack(upper, out)`` does the reverse for a container's upper directory (commit, build).
Standard library only.
"""
import gzip
import hashlib
import io
import os
import posixpath
import re
import shutil
import stat
import tarfile
import zlib

from ..wire.errors import InvalidSpec, LabkitError, UnsafeLayer
from .kernel import write_all

WH = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# the signatures of what a tar reader could decompress by itself where a plain tar belongs
COMPRESSED = (("gzip", re.compile(re.escape(b"\x1f\x8b"))), ("bzip2", re.compile(rb"BZh[1-9]1AY&SY")),
              ("xz", re.compile(re.escape(b"\xfd7zXZ\x00"))), ("zstd", re.compile(re.escape(b"\x28\xb5\x2f\xfd"))))
GZIP_MAX_RATIO = 100        # decompressed / compressed size of a gzip layer ...
GZIP_FREE_BYTES = 16 << 20  # ... beyond this much, which any layer may decompress to
MAX_LAYER_BYTES = 16 << 30  # one layer once decompressed


def gunzip_limit(size):
    """How far a gzip layer of ``size`` bytes may decompress (the registry client applies its own copy)."""
    return min(MAX_LAYER_BYTES, max(GZIP_FREE_BYTES, GZIP_MAX_RATIO * size))


def gunzip_bounded(blob, out, limit, what, how=""):
    """Decompress the gzip file ``blob`` into the new file ``out``, refusing past ``limit`` bytes (a gzip bomb)
    and a broken stream; returns the sha256 of what was written."""
    h, total = hashlib.sha256(), 0
    with gzip.open(blob, "rb") as src, open(out, "xb") as dst:
        while True:
            try:
                chunk = src.read(min(1 << 20, limit + 1 - total))
            except (OSError, EOFError, zlib.error) as exc:
                raise UnsafeLayer(f"{what} is not a valid gzip stream: {exc}",
                                  fix="the image is corrupt or malicious: do not use it") from None
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise UnsafeLayer(f"{what} decompresses to more than {limit} bytes (a gzip bomb?)"
                                  + (f": {how}" if how else ""), fix="do not use this image")
            h.update(chunk)
            dst.write(chunk)
    return "sha256:" + h.hexdigest()


def check_plain_tar(path, what):
    """Refuse anything but an uncompressed tar: no compressed stream's signature, and a first block that is a
    tar header with the right checksum (or the zero block of an empty tar)."""
    with open(path, "rb") as f:
        head = f.read(512)
    for name, magic in COMPRESSED:
        if magic.match(head):
            raise UnsafeLayer(f"{what} holds a compressed stream ({name}) where an uncompressed tar belongs",
                              fix="labkit unpacks tar and tar+gzip layers only: pull a gzip build of the image")
    if head == bytes(512) or not head:
        return
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except (tarfile.TarError, ValueError) as exc:
        raise UnsafeLayer(f"{what} is not a tar archive: its first block is no tar header ({exc})",
                          fix="do not use this image") from None


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


O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = 256  # path components of one entry: deeper than any real image, shallow enough for every walk


def _lstat_at(dir_fd, name):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd, name):
    """Remove ``name`` in ``dir_fd`` (a whole tree when it is a directory), never following a symlink."""
    if name in ("", ".", "..") or "/" in name:
        raise UnsafeLayer(f"refusing to remove {name!r}: only an entry of the directory itself may go")
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    stack = [(dir_fd, name, None)]  # iterative: a deep tree must not exhaust Python's recursion
    while stack:
        parent, child, fd = stack.pop()
        if fd is None:
            fd = os.open(child, O_DIR, dir_fd=parent)
            subdirs = []
            for entry in os.listdir(fd):
                est = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(est.st_mode):
                    subdirs.append(entry)
                else:
                    os.unlink(entry, dir_fd=fd)
            stack.append((parent, child, fd))
            stack.extend((fd, d, None) for d in subdirs)
        else:
            os.close(fd)
            os.rmdir(child, dir_fd=parent)


def _open_parent(root_fd, rel, create):
    """An fd of the directory that holds ``rel`` (walked one component at a time with O_NOFOLLOW, so no entry
    is ever reached through a symlink), and the entry's own name. ``create``: make missing directories."""
    parts = rel.split("/")
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nxt = os.open(part, O_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise UnsafeLayer(f"entry {rel!r} refers to {'/'.join(parts[:i + 1])!r}, which is not in the layer")
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, O_DIR, dir_fd=fd)
            except (NotADirectoryError, OSError) as exc:
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise UnsafeLayer(f"entry {rel!r} would be written through the symlink "
                                      f"{'/'.join(parts[:i + 1])!r}") from None
                raise UnsafeLayer(f"entry {rel!r} lies below {'/'.join(parts[:i + 1])!r}, which is not a "
                                  f"directory ({exc.strerror})") from None
            os.close(fd)
            fd = nxt
        return fd, parts[-1]
    except BaseException:
        os.close(fd)
        raise


def _set_meta(fd, m):
    """Owner first (chown clears set-user-ID bits, even for root), then mode, then times: on the open file."""
    os.fchown(fd, m.uid, m.gid)
    os.fchmod(fd, m.mode & 0o7777)
    os.utime(fd, (m.mtime, m.mtime))


def unpack(blob, dest, digest=None):
    """Verify and unpack a layer tar; returns a list of (kind, path) for whiteouts, opaque dirs and the
    device nodes that were left out.

    Every step acts on the entry itself through directory file descriptors and O_NOFOLLOW: a symlink that an
    earlier entry made is never followed, so a layer cannot reach a file outside the directory it is
    unpacked into, whatever order its entries come in. Device nodes are not created (a container's /dev
    is made when it starts, as Docker does for rootless and user-namespaced containers): they are
    recorded as ('device', path) so the caller can say so."""
    if digest is not None:
        got = sha256_file(blob)
        if got != digest:
            raise UnsafeLayer(f"layer digest mismatch: expected {digest}, the blob is {got}",
                              fix="the registry or file lied about the content: fetch it again or do not use it")
    if os.path.lexists(dest):
        raise InvalidSpec(f"{dest} exists already", fix="layers are immutable: unpack each one once")
    # a name of its own: two agents may unpack the same layer at once; the first rename wins
    tmp = f"{dest}.unpacking-{os.getpid()}-{os.urandom(4).hex()}"
    os.makedirs(tmp, mode=0o700)
    special = []
    root_fd = os.open(tmp, O_DIR)
    try:
        check_plain_tar(blob, f"layer {digest or os.path.basename(blob)}")
        with tarfile.open(blob, "r:") as tar:  # plain tar only: never a decompressor without a bound
            seen, written = set(), 0
            for m in tar:
                if m.issparse() or m.type == tarfile.GNUTYPE_SPARSE or \
                        any(k.startswith("GNU.sparse") for k in (m.pax_headers or {})):
                    raise UnsafeLayer(f"entry {m.name!r} is a sparse file: its holes would be written out in full "
                                      "(a tiny tar can fill the disk)", fix="rebuild the image without sparse files")
                written += m.size if m.isreg() else 0
                if written > MAX_LAYER_BYTES:
                    raise UnsafeLayer(f"the layer unpacks to more than {MAX_LAYER_BYTES} bytes",
                                      fix="do not use this image (labkit bounds what a layer may write)")
                rel = _clean_name(m.name)
                if not rel:
                    continue
                if rel.count("/") >= MAX_DEPTH:
                    raise UnsafeLayer(f"entry {rel[:80]!r}... is {rel.count('/') + 1} directories deep "
                                      f"(more than {MAX_DEPTH})")
                try:
                    kind = _unpack_entry(tar, m, rel, root_fd, seen)
                except UnsafeLayer:
                    raise
                except (OSError, ValueError, OverflowError, tarfile.TarError) as exc:
                    raise UnsafeLayer(f"entry {rel!r} could not be unpacked: {exc}") from None
                if kind:
                    special.append(kind)
                else:
                    seen.add(rel)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another agent unpacked the same digest first
    except LabkitError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, ValueError, EOFError) as exc:  # the tar itself is malformed
        shutil.rmtree(tmp, ignore_errors=True)
        raise UnsafeLayer(f"layer {digest or os.path.basename(blob)} is not a valid tar archive: {exc}",
                          fix="do not use this image") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # fd-based on Linux: never follows the layer's symlinks
        raise
    finally:
        os.close(root_fd)
    return special


def _unpack_entry(tar, m, rel, root_fd, seen):
    """Write one tar member below root_fd; returns a (kind, path) for a special entry, else None."""
    base = posixpath.basename(rel)
    if base == OPAQUE:
        pfd, _ = _open_parent(root_fd, rel, create=True)
        try:
            os.setxattr(pfd, OPAQUE_XATTR, b"y")
        finally:
            os.close(pfd)
        return ("opaque", posixpath.dirname(rel) or "/")
    if m.ischr() or m.isblk():  # (tarfile's isdev() counts FIFOs too)
        return ("device", rel)
    if m.issym() and _symlink_escapes(rel, m.linkname):
        raise UnsafeLayer(f"symlink {rel!r} -> {m.linkname!r} points outside the root")
    if m.islnk():
        link = _clean_name(m.linkname)
        if link not in seen:
            raise UnsafeLayer(f"hard link {rel!r} -> {m.linkname!r} points outside the layer "
                              "(or to an entry that is not in it)")
    pfd, name = _open_parent(root_fd, rel, create=True)
    try:
        if base.startswith(WH):
            gone = base[len(WH):]
            if gone in ("", ".", ".."):
                raise UnsafeLayer(f"whiteout {rel!r} names {gone!r}: a whiteout hides one entry of its directory, "
                                  "never the directory or its parent")
            _remove_at(pfd, gone)
            os.mknod(gone, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
            return ("whiteout", posixpath.join(posixpath.dirname(rel), gone))
        st = _lstat_at(pfd, name)
        if st is not None and not (m.isdir() and stat.S_ISDIR(st.st_mode)):
            _remove_at(pfd, name)
        if m.isdir():
            if st is None or not stat.S_ISDIR(st.st_mode):
                os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, O_DIR, dir_fd=pfd)
            try:
                _set_meta(fd, m)
            finally:
                os.close(fd)
        elif m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=pfd)
            try:
                src = tar.extractfile(m)
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    write_all(fd, chunk)
                _set_meta(fd, m)
            finally:
                os.close(fd)
        elif m.issym():
            os.symlink(m.linkname, name, dir_fd=pfd)
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
        elif m.islnk():
            link = _clean_name(m.linkname)
            lfd, lname = _open_parent(root_fd, link, create=False)
            try:
                lst = _lstat_at(lfd, lname)
                if lst is None or stat.S_ISLNK(lst.st_mode) or stat.S_ISDIR(lst.st_mode):
                    raise UnsafeLayer(f"hard link {rel!r} -> {m.linkname!r} targets "
                                      + ("nothing" if lst is None else "a symlink" if stat.S_ISLNK(lst.st_mode)
                                         else "a directory"))
                os.link(lname, name, src_dir_fd=lfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(lfd)
        elif m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                _set_meta(fd, m)
            finally:
                os.close(fd)
        else:
            raise UnsafeLayer(f"entry {rel!r} has an unknown type {m.type!r}")
    finally:
        os.close(pfd)
    return None


def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def _is_opaque(fd):
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def pack(upper, out):
    """Write ``upper`` (an overlay upper dir, or any root) as an OCI layer tar; returns (digest, entries).

    Deterministic: sorted names, whole-second mtimes, no user names, so the same tree gives the same digest.
    The tree may belong to a running container whose root swaps things for symlinks while this runs: every
    directory is opened relative to its parent with O_DIRECTORY|O_NOFOLLOW|O_NONBLOCK, every file with
    O_NOFOLLOW|O_NONBLOCK and must still be the inode that was listed, so nothing outside ``upper`` is ever
    read or opened (no FIFO to hang on, no device). Sockets are left out (a tar cannot hold them); a file
    whose name starts with ``.wh.`` is refused (OCI reserves the prefix for whiteouts)."""
    entries = []
    links = {}
    with open(out, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        stack = [("", os.open(upper, O_DIR | os.O_NONBLOCK))]
        try:
            while stack:
                rel_dir, dfd = stack.pop()
                try:
                    subdirs = _pack_dir(tar, rel_dir, dfd, entries, links)
                    for name in reversed(subdirs):  # depth first, in sorted order
                        sub = posixpath.join(rel_dir, name) if rel_dir else name
                        try:
                            stack.append((sub, os.open(name, O_DIR | os.O_NONBLOCK, dir_fd=dfd)))
                        except OSError as exc:
                            raise UnsafeLayer(f"{sub!r} changed while it was being packed ({exc.strerror})",
                                              fix="stop the container, then commit it again") from None
                finally:
                    os.close(dfd)
        finally:
            for _, fd in stack:
                os.close(fd)
    return sha256_file(out), entries


def _pack_dir(tar, rel_dir, dfd, entries, links):
    """Add the entries of one directory (held by ``dfd``); returns the names of its subdirectories."""
    if rel_dir and _is_opaque(dfd):
        tar.addfile(tarfile.TarInfo(posixpath.join(rel_dir, OPAQUE)))
        entries.append(("opaque", rel_dir))
    subdirs = []
    for name in sorted(os.listdir(dfd)):
        rel = posixpath.join(rel_dir, name) if rel_dir else name
        st = _lstat_at(dfd, name)
        if st is None or stat.S_ISSOCK(st.st_mode):
            continue
        if _is_whiteout(st):
            info = tarfile.TarInfo(posixpath.join(rel_dir, WH + name) if rel_dir else WH + name)
            info.mtime = int(st.st_mtime)
            tar.addfile(info)
            entries.append(("whiteout", rel))
            continue
        if name.startswith(WH):
            raise UnsafeLayer(f"{rel!r}: a file named '{WH}...' cannot go into a layer (the prefix marks whiteouts)",
                              fix="rename or remove it, then commit again")
        info = tarfile.TarInfo(rel)
        info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        info.mtime, info.uname, info.gname = int(st.st_mtime), "", ""
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in links:
            info.type, info.linkname = tarfile.LNKTYPE, links[key]
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            _add_file(tar, info, dfd, name, st)
            if st.st_nlink > 1:
                links[key] = rel
        elif stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            subdirs.append(name)
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dfd)
            tar.addfile(info)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
            tar.addfile(info)
        else:
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            tar.addfile(info)
        entries.append(("file" if info.isreg() else "dir" if info.isdir() else
                        "symlink" if info.issym() else "other", rel))
    return subdirs


def _add_file(tar, info, dfd, name, st):
    """Add a regular file read through an fd opened with O_NOFOLLOW that must be the inode listed."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    with os.fdopen(fd, "rb") as src:
        fst = os.fstat(src.fileno())
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise UnsafeLayer(f"{info.name!r} changed while it was being packed (it is no longer the file "
                              "that was listed)", fix="stop the container, then commit it again")
        info.size = fst.st_size
        tar.addfile(info, src)


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
