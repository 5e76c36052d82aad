"""Untrusted layers: every malicious tar is refused by name and leaves nothing on disk."""
import io
import os
import stat
import tarfile

import pytest

from labkit.agent import tarsafe
from labkit.wire.errors import InvalidSpec, UnsafeLayer

pytestmark = pytest.mark.privileged


def make_tar(path, entries):
    """entries: (name, kind, extra) with kind file|dir|dir07777|symlink|hardlink|chardev|blockdev|fifo."""
    with tarfile.open(path, "w") as tar:
        for name, kind, extra in entries:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                data = extra.encode()
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            elif kind == "chardev":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "blockdev":
                info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 7, 0
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "dir07777":
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o7777, 12345

            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


MALICIOUS = {
    "absolute path": ([("/etc/evil", "file", "x")], "absolute path"),
    "dot-dot escape": ([("a/../../evil", "file", "x")], "'..'"),
    "symlink escape": ([("up", "symlink", "../../../../etc")], "points outside the root"),
    "write through a symlink": ([("etc", "symlink", "/etc"), ("etc/evil", "file", "x")], "through the symlink"),
    "hard link escape": ([("passwd", "hardlink", "../../etc/passwd")], "'..'"),
    "hard link to nothing in the layer": ([("passwd", "hardlink", "etc/shadow")], "outside the layer"),
    "lies below a file": ([("f", "file", "x"), ("f/g", "file", "y")], "not a directory"),
    "too deep": ([("a/" * 300 + "x", "file", "x")], "directories deep"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_layers_are_refused_and_leave_nothing(case, tmp_path):
    entries, said = MALICIOUS[case]
    blob = make_tar(str(tmp_path / "layer.tar"), [("ok.txt", "file", "fine")] + entries)
    dest = str(tmp_path / "out")
    with pytest.raises(UnsafeLayer) as err:
        tarsafe.unpack(blob, dest, digest=tarsafe.sha256_file(blob))
    assert said in str(err.value), str(err.value)
    assert not os.path.exists(dest) and not [n for n in os.listdir(tmp_path) if ".unpacking" in n]
    assert not os.path.exists("/etc/evil")


def test_digest_mismatch_is_refused_before_anything_is_written(tmp_path):
    blob = make_tar(str(tmp_path / "layer.tar"), [("ok.txt", "file", "fine")])
    with pytest.raises(UnsafeLayer, match="digest mismatch"):
        tarsafe.unpack(blob, str(tmp_path / "out"), digest="sha256:" + "0" * 64)
    assert not os.path.exists(tmp_path / "out")


def test_safe_links_inside_the_root_are_kept(tmp_path):
    blob = make_tar(str(tmp_path / "layer.tar"), [
        ("bin/busybox", "file", "#!"), ("bin/sh", "symlink", "/bin/busybox"), ("usr/bin/env", "symlink", "../../bin/busybox"),
        ("bin/ash", "hardlink", "bin/busybox")])
    tarsafe.unpack(blob, str(tmp_path / "out"))
    assert os.readlink(tmp_path / "out/bin/sh") == "/bin/busybox"
    assert os.stat(tmp_path / "out/bin/ash").st_ino == os.stat(tmp_path / "out/bin/busybox").st_ino


def test_whiteouts_round_trip_between_overlay_and_oci_form(tmp_path):
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/hostname").write_text("changed\n")
    os.mknod(upper / "etc/os-release", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "www").mkdir()
    os.setxattr(upper / "www", tarsafe.OPAQUE_XATTR, b"y")
    digest, entries = tarsafe.pack(str(upper), str(tmp_path / "l.tar"))
    names = tarfile.open(tmp_path / "l.tar").getnames()
    assert "etc/.wh.os-release" in names and "www/.wh..wh..opq" in names
    assert ("whiteout", "etc/os-release") in entries and ("opaque", "www") in entries
    special = tarsafe.unpack(str(tmp_path / "l.tar"), str(tmp_path / "back"), digest=digest)
    st = os.lstat(tmp_path / "back/etc/os-release")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(tmp_path / "back/www", tarsafe.OPAQUE_XATTR) == b"y"
    assert sorted(special) == [("opaque", "www"), ("whiteout", "etc/os-release")]
    # packing is deterministic: the same tree gives the same digest
    assert tarsafe.pack(str(upper), str(tmp_path / "l2.tar"))[0] == digest


def _victim(tmp_path):
    """A host directory and file outside the unpack target, with a known mode and mtime."""
    d = tmp_path / "victim"
    d.mkdir()
    (d / "file").write_text("host data\n")
    os.chmod(d, 0o755)
    os.chmod(d / "file", 0o644)
    os.utime(d, (1000, 1000))
    os.utime(d / "file", (2000, 2000))
    return d


def _fingerprint(d):
    out = {}
    for p in [d] + sorted(d.iterdir()):
        st = os.lstat(p)
        out[str(p)] = (st.st_mode, st.st_mtime, st.st_uid, st.st_gid, st.st_nlink,
                       p.read_bytes() if p.is_file() else None)
    out["xattr"] = os.listxattr(d)
    return out


# Each layer plants a symlink to a host path, then an entry of the same name (or below it): the old unpacker
# followed the link and chmod'ed/utime'd the host directory (it became mode 07777).
LINK_ATTACKS = {
    "dir over a symlink to a host dir": lambda v: [("x", "symlink", str(v)), ("x", "dir07777", None)],
    "file over a symlink to a host file": lambda v: [("x", "symlink", str(v / "file")), ("x", "file", "pwned")],
    "fifo over a symlink to a host file": lambda v: [("x", "symlink", str(v / "file")), ("x", "fifo", None)],
    "whiteout of a symlink": lambda v: [("x", "symlink", str(v)), (".wh.x", "file", "")],
    "opaque marker below a symlink": lambda v: [("x", "symlink", str(v)), ("x/.wh..wh..opq", "file", "")],
    "hard link to a symlink": lambda v: [("x", "symlink", str(v / "file")), ("y", "hardlink", "x")],
    "file below a symlink": lambda v: [("x", "symlink", str(v)), ("x/file", "file", "pwned")],
}


@pytest.mark.parametrize("case", sorted(LINK_ATTACKS))
def test_no_entry_reaches_the_host_through_a_symlink(case, tmp_path):
    victim = _victim(tmp_path)
    before = _fingerprint(victim)
    blob = make_tar(str(tmp_path / "layer.tar"), LINK_ATTACKS[case](victim))
    dest = tmp_path / "out"
    try:
        tarsafe.unpack(blob, str(dest), digest=tarsafe.sha256_file(blob))
        refused = None
    except UnsafeLayer as exc:
        refused = exc
    assert _fingerprint(victim) == before, "the host directory changed"
    if refused is None:  # replaced in the layer, as a tar's later entry replaces an earlier one
        st = os.lstat(dest / "x")
        assert not stat.S_ISLNK(st.st_mode) or case == "hard link to a symlink"
    else:
        assert "symlink" in str(refused), str(refused)
        assert not dest.exists() and not [n for n in os.listdir(tmp_path) if ".unpacking" in n]


def test_a_dir_entry_replaces_a_symlink_and_keeps_its_own_mode(tmp_path):
    victim = _victim(tmp_path)
    blob = make_tar(str(tmp_path / "layer.tar"), [("x", "symlink", str(victim)), ("x", "dir07777", None)])
    tarsafe.unpack(blob, str(tmp_path / "out"))
    st = os.lstat(tmp_path / "out/x")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o7777 and st.st_mtime == 12345
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o755


def test_device_nodes_are_left_out_and_reported(tmp_path):
    """Real root trees (debootstrap, `docker import`) carry /dev/null and friends: the layer unpacks,
    without them; the container's /dev is made at start."""
    blob = make_tar(str(tmp_path / "layer.tar"), [("dev", "dir", None), ("dev/null", "chardev", None),
                                                   ("dev/loop0", "blockdev", None), ("etc/hostname", "file", "x")])
    special = tarsafe.unpack(blob, str(tmp_path / "out"))
    assert sorted(special) == [("device", "dev/loop0"), ("device", "dev/null")]
    assert os.listdir(tmp_path / "out/dev") == [] and (tmp_path / "out/etc/hostname").read_text() == "x"


def test_setuid_bits_survive_the_owner_change(tmp_path):
    """chown clears set-user-ID bits (even for root): the owner is set first, then the mode."""
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("bin/su")
        info.size, info.mode, info.uid, info.gid = 2, 0o4755, 0, 0
        tar.addfile(info, io.BytesIO(b"#!"))
    tarsafe.unpack(str(path), str(tmp_path / "out"))
    assert stat.S_IMODE(os.stat(tmp_path / "out/bin/su").st_mode) == 0o4755


def test_pack_never_reads_through_a_symlink_swapped_in(tmp_path, monkeypatch):
    """A running container may swap a file for a symlink to a host file between listing and reading."""
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "a").write_text("container data")
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    real_open = os.open

    def swapping_open(name, flags, *a, dir_fd=None, **kw):
        if name == "a" and dir_fd is not None:  # the moment between listing and opening
            os.unlink("a", dir_fd=dir_fd)
            os.symlink(str(secret), "a", dir_fd=dir_fd)
        return real_open(name, flags, *a, dir_fd=dir_fd, **kw)
    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises((UnsafeLayer, OSError)):
        tarsafe.pack(str(upper), str(tmp_path / "l.tar"))
    monkeypatch.undo()
    if (tmp_path / "l.tar").exists() and os.path.getsize(tmp_path / "l.tar"):
        with tarfile.open(tmp_path / "l.tar") as tar:
            assert all(b"host secret" not in tar.extractfile(m).read() for m in tar if m.isreg())


def test_two_unpacks_of_one_layer_at_once_both_succeed(tmp_path):
    import threading
    blob = make_tar(str(tmp_path / "layer.tar"), [(f"d/f{i}", "file", "x" * 1000) for i in range(300)])
    errors = []

    def go():
        try:
            tarsafe.unpack(blob, str(tmp_path / "out"))
        except InvalidSpec:
            pass  # the other one had finished before this one started: "exists already"
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=go) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and len(os.listdir(tmp_path / "out/d")) == 300
    assert not [n for n in os.listdir(tmp_path) if ".unpacking" in n]


def test_whiteouts_of_dot_and_dot_dot_are_refused_and_the_store_is_untouched(tmp_path):
    """'.wh...' would have removed the parent of the unpack directory: every stored layer."""
    neighbour = tmp_path / "another-layer"
    neighbour.mkdir()
    (neighbour / "f").write_text("keep")
    for name in (".wh...", ".wh..", "d/.wh..."):
        blob = make_tar(str(tmp_path / "layer.tar"), [("d", "dir", None), (name, "file", "")])
        with pytest.raises(UnsafeLayer, match="whiteout"):
            tarsafe.unpack(blob, str(tmp_path / "out"))
        assert (neighbour / "f").read_text() == "keep" and not (tmp_path / "out").exists()


def test_a_sparse_member_is_refused_before_it_writes_its_holes(tmp_path):
    """A pax sparse member of 10 KiB on disk that would unpack to 1 GiB of zeros."""
    path = tmp_path / "sparse.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("GNUSparseFile.0/big")
        info.size = 0
        info.pax_headers = {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(1 << 30)}
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(UnsafeLayer, match="sparse"):
        tarsafe.unpack(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_pack_refuses_a_directory_swapped_for_a_link_to_a_fifo(tmp_path, monkeypatch):
    """The container turns a listed directory into a symlink to a FIFO: opening it must not block or follow."""
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    (upper / "d" / "f").write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    real_open = os.open

    def swapping_open(name, flags, *a, dir_fd=None, **kw):
        if name == "d" and dir_fd is not None and flags & os.O_DIRECTORY:  # after the listing, before the open
            import shutil
            shutil.rmtree(upper / "d")
            os.symlink(fifo, upper / "d")
        return real_open(name, flags, *a, dir_fd=dir_fd, **kw)
    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(UnsafeLayer, match="changed while"):
        tarsafe.pack(str(upper), str(tmp_path / "l.tar"))


def test_pack_refuses_a_file_named_like_a_whiteout(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / ".wh...").write_text("")
    with pytest.raises(UnsafeLayer, match="whiteouts"):
        tarsafe.pack(str(upper), str(tmp_path / "l.tar"))
