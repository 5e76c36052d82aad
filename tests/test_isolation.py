"""The isolation matrix agrees with what each configuration really isolates."""
import pytest

pytestmark = pytest.mark.privileged


def test_matrix_rows(lab, rootfs_name, tmp_path):
    res = lab.isolation_matrix(rootfs=rootfs_name)
    m = res.matrix
    assert m.loc["plain process"].tolist() == [1] * 6
    assert m.loc["container (all + pivot_root)"].tolist() == [0] * 6
    assert m.loc["net", "links"] == 0 and m.loc["net"].sum() == 5
    assert m.loc["uts", "hostname"] == 0 and m.loc["user", "users"] == 0
    assert m.loc["pid (host /proc)", "host PIDs"] == 1 and m.loc["pid + mnt (own /proc)", "host PIDs"] == 0
    assert m.loc["chroot", "files"] == 0 and m.loc["chroot", "host PIDs"] == 1
    assert "hostname 'lk-uts'" == res.reasons.loc["uts", "hostname"]
    from labkit import plotting
    path = plotting.save(res.chart(), str(tmp_path), "m")
    assert path.endswith("m.png")
