"""Untrusted layers: every malicious tar is refused by name and leaves nothing on disk."""
import io
import os
import stat
import tarfile

import pytest

from labkit.agent import tarsafe
from labkit.errors import UnsafeLayer

pytestmark = pytest.mark.privileged


def make_tar(path, entries):
    """entries: (name, kind, extra) with kind file|dir|symlink|hardlink|chardev."""
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
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


MALICIOUS = {
    "absolute path": ([("/etc/evil", "file", "x")], "absolute path"),
    "dot-dot escape": ([("a/../../evil", "file", "x")], "'..'"),
    "symlink escape": ([("up", "symlink", "../../../../etc")], "points outside the root"),
    "write through a symlink": ([("etc", "symlink", "/etc"), ("etc/evil", "file", "x")], "through the symlink"),
    "hard link escape": ([("passwd", "hardlink", "../../etc/passwd")], "'..'"),
    "hard link to nothing in the layer": ([("passwd", "hardlink", "etc/shadow")], "outside the layer"),
    "device node": ([("dev/mem", "chardev", None)], "device node"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_layers_are_refused_and_leave_nothing(case, tmp_path):
    entries, said = MALICIOUS[case]
    blob = make_tar(str(tmp_path / "layer.tar"), [("ok.txt", "file", "fine")] + entries)
    dest = str(tmp_path / "out")
    with pytest.raises(UnsafeLayer) as err:
        tarsafe.unpack(blob, dest, digest=tarsafe.sha256_file(blob))
    assert said in str(err.value), str(err.value)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".unpacking")
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
