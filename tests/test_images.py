"""Images and overlay roots: copy-up, whiteouts, build cache, commit, OCI export/import, skopeo."""
import json
import os
import shutil
import subprocess
import time

import pytest

from labkit.agent import cgroups
from labkit.wire.errors import BuildFailed, InvalidSpec, NotFound, UnsafeLayer

pytestmark = pytest.mark.privileged

RECIPE = """FROM busybox
RUN echo one > /one  # {run}
RUN echo two > /two
COPY page.html /var/www/index.html
RUN echo {four} > /four
CMD ["httpd", "-f", "-h", "/var/www"]
"""


@pytest.fixture
def root(lab):
    r = lab.container_root("busybox", "t-overlay")
    yield r
    r.remove()


def test_overlay_copy_up_whiteout_and_opaque_dir(lab, root):
    rec = root.run(["sh", "-c", "echo changed > /etc/hostname; rm /etc/os-release; rm -rf /var/www; "
                                "mkdir /var/www; echo new > /var/www/index.html"])
    assert rec.exit_code == 0, rec.stderr
    kinds = {c["path"]: c["kind"] for c in root.changes()}
    assert kinds["/etc/hostname"] == "file"
    assert kinds["/etc/os-release"].startswith("whiteout")
    assert kinds["/var/www"].startswith("opaque")
    # the image's layer is untouched: a second root from the same image still has the old files
    with lab.container_root("busybox", "t-overlay2") as other:
        assert "labkit busybox" in other.run(["cat", "/etc/os-release"]).stdout


def test_commit_turns_changes_into_a_new_image(lab, root):
    root.run(["sh", "-c", "echo committed > /note; rm /etc/os-release"])
    rec = root.commit("t-committed:v1")
    assert len(rec["image"]["layers"]) == 2
    try:
        with lab.container_root("t-committed:v1", "t-from-commit") as r2:
            out = r2.run(["sh", "-c", "cat /note; test -e /etc/os-release && echo still-there || echo gone"]).stdout
            assert out.split() == ["committed", "gone"]
    finally:
        lab.rmi("t-committed:v1")
        lab.prune()


def test_build_cache_rebuilds_only_from_the_changed_line(lab):
    ctx = {"page.html": "<h1>hi</h1>"}
    recipe = lambda four: RECIPE.format(four=four, run=os.urandom(6).hex() if four is None else run)  # noqa: E731
    run = os.urandom(6).hex()  # the cache is the store's, shared across runs: make this run's lines new
    keys = set()
    build = lab.build

    def tracked(*a, **kw):
        rec = build(*a, **kw)
        keys.update(st["key"] for st in rec["steps"][1:])
        return rec
    lab_build = tracked
    try:
        cold = lab_build(recipe("4"), "t-built:v1", context=ctx)
        assert cold["rebuilt"] in ([1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6])  # FROM may be cached by earlier builds
        warm = lab_build(recipe("4"), "t-built:v1", context=ctx)
        assert warm["rebuilt"] == []
        changed = lab_build(recipe("FOUR"), "t-built:v1", context=ctx)
        assert changed["rebuilt"] == [5, 6]
        ctx2 = {"page.html": "<h1>changed</h1>"}
        assert lab_build(recipe("FOUR"), "t-built:v1", context=ctx2)["rebuilt"] == [4, 5, 6]
        assert lab_build(recipe("FOUR"), "t-built:v1", context=ctx2, no_cache=True)["rebuilt"] == [1, 2, 3, 4, 5, 6]
        img = lab.image("t-built:v1")
        assert len(img["layers"]) == 5 and img["config"]["Cmd"] == ["httpd", "-f", "-h", "/var/www"]
        with lab.container_root("t-built:v1", "t-built-run") as r:
            assert r.run(["cat", "/one", "/two", "/four", "/var/www/index.html"]).stdout.split() == \
                ["one", "two", "FOUR", "<h1>changed</h1>"]
    finally:
        lab.rmi("t-built:v1")
        lab.prune(cache_keys=keys)


def test_a_failing_build_step_says_which_and_leaves_nothing(lab):
    with pytest.raises(BuildFailed, match="step 2: RUN exit 3"):
        lab.build("FROM busybox\nRUN exit 3\n", "t-broken:v1")
    assert not any(n.startswith("build-") for n in os.listdir("/var/lib/labkit/containers"))
    with pytest.raises(NotFound):
        lab.image("t-broken:v1")


def test_bad_recipes_and_names(lab):
    with pytest.raises(InvalidSpec, match="unknown instruction"):
        lab.build("FROM busybox\nEXPOSE 80\n", "t-x:v1")
    with pytest.raises(InvalidSpec, match="starts with FROM"):
        lab.build("RUN true\n", "t-x:v1")
    with pytest.raises(BuildFailed, match="not in the build context"):
        lab.build("FROM busybox\nCOPY missing.txt /\n", "t-x:v1")
    with pytest.raises(InvalidSpec, match="not allowed"):
        lab.build("FROM busybox\n", "../../etc/passwd")
    with pytest.raises(InvalidSpec, match="not allowed"):
        lab.call("image.inspect", ref="a/../../b")
    with pytest.raises(NotFound, match="no image"):
        lab.container_root("no-such-image", "t-x")


@pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo is not installed (scripts/setup.sh --dev installs it)")
def test_oci_export_import_and_skopeo_both_ways(lab, tmp_path):
    lab.build("FROM busybox\nRUN echo oci > /oci\nENV K=V\n", "t-oci:v1")
    try:
        out = str(tmp_path / "layout")
        exp = lab.export_image("t-oci:v1", out)
        info = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{out}:v1"], capture_output=True, text=True,
                                         check=True).stdout)
        assert info["Layers"] == exp["layers"] and "K=V" in info["Env"]
        copy = str(tmp_path / "copy")
        subprocess.run(["skopeo", "copy", "-q", f"oci:{out}:v1", f"oci:{copy}:again"], check=True)
        back = lab.import_image(copy, "t-oci-back:v1", tag="again")
        assert back["layers"] == exp["layers"]
        with lab.container_root("t-oci-back:v1", "t-oci-run") as r:
            assert r.run(["cat", "/oci"]).stdout.strip() == "oci"
        # a tampered layout is refused
        blob = os.path.join(out, "blobs", "sha256", exp["layers"][-1].split(":")[1])
        with open(blob, "r+b") as f:
            f.seek(600)
            f.write(b"X")
        with pytest.raises(UnsafeLayer, match="does not match"):
            lab.import_image(out, "t-oci-tampered:v1")
    finally:
        for ref in ("t-oci:v1", "t-oci-back:v1"):
            try:
                lab.rmi(ref)
            except NotFound:
                pass
        lab.prune()


def test_recipes_cannot_write_outside_their_tree(lab):
    """COPY to /../../.. and WORKDIR ../.. stop at the image's root, as in Docker; the host is untouched."""
    mark = "labkit-escape-" + os.urandom(4).hex()
    recipe = (f"FROM busybox\nCOPY f /../../../../../../tmp/{mark}\nWORKDIR ../../../../../tmp/{mark}-wd\n"
              f"COPY g ../../../../../tmp/{mark}-rel\n")
    rec = lab.build(recipe, "t-escape:v1", context={"f": "from f\n", "g": "from g\n"})
    try:
        assert not os.path.exists(f"/tmp/{mark}") and not os.path.exists(f"/var/tmp/{mark}")
        assert not os.path.exists(f"/tmp/{mark}-rel") and not os.path.exists(f"/tmp/{mark}-wd")
        assert rec["image"]["config"]["WorkingDir"] == f"/tmp/{mark}-wd"
        with lab.container_root("t-escape:v1", "t-escape") as root:
            out = root.run(["cat", f"/tmp/{mark}", f"/tmp/{mark}-rel"]).stdout
        assert out == "from f\nfrom g\n"
    finally:
        lab.rmi("t-escape:v1")


def _layout(tmp_path, config):
    """A one-layer OCI image layout with the given image config (what skopeo would leave)."""
    import io
    import tarfile
    from conftest import oci_layout
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    return oci_layout(tmp_path / "layout", buf.getvalue(), config)


def test_an_image_whose_workdir_climbs_out_is_refused(lab, tmp_path):
    src = _layout(tmp_path, {"WorkingDir": "../../../../../../tmp/evil", "Cmd": ["/bin/sh"]})
    with pytest.raises(InvalidSpec, match="WorkingDir .* is not an absolute path"):
        lab.import_image(src, "t-evilwd:v1")
    with pytest.raises(NotFound):
        lab.image("t-evilwd:v1")
    src2 = _layout(tmp_path / "2", {"WorkingDir": "/app/../../..", "Env": ["A=1"], "Entrypoint": ["/bin/echo"],
                                     "Cmd": ["hi"]})
    lab.import_image(src2, "t-wd:v1")
    try:
        cfg = lab.image("t-wd:v1")["config"]
        assert cfg["WorkingDir"] == "/" and cfg["Cmd"] == ["/bin/echo", "hi"] and cfg["Env"] == ["A=1"]
    finally:
        lab.rmi("t-wd:v1")


def test_prune_keeps_the_layers_of_a_live_root_whose_record_is_lost(lab):
    """A running container's image.json truncated (and set aside): its layers are still in use, and the kernel's
    mount table says so."""
    lab.build("FROM busybox\nRUN echo live > /live  # %s\n" % os.urandom(4).hex(), "t-live:v1")
    layers = lab.image("t-live:v1")["layers"]
    with lab.container_root("t-live:v1", "t-liveroot") as root:
        lab.rmi("t-live:v1")
        with open("/var/lib/labkit/containers/t-liveroot/image.json", "w") as f:
            f.write('{"layers": [')
        lab.prune(all_cache=True)
        assert all(os.path.isdir(f"/var/lib/labkit/layers/sha256/{d.split(':')[1]}") for d in layers)
        assert root.run(["cat", "/live"]).stdout == "live\n"
    lab.prune(all_cache=True)


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_an_image_runs_as_an_oci_bundle_under_another_runtime(lab, runtime):
    """Lab 04's runtime-spec demo: crun and runc (scripts/setup.sh installs both) run busybox from a bundle made
    here; the bundle, its overlay root and the runtime's cgroup are gone afterwards."""
    ran = lab.run_bundle("busybox", ["sh", "-c", "echo $$ $(hostname)"], runtime=runtime)
    pid, host = ran["stdout"].split()
    assert ran["exit_code"] == 0 and pid == "1" and host.startswith("oci-"), ran
    assert ran["config"]["ociVersion"] == "1.0.2" and ran["config"]["process"]["args"][0] == "sh"
    assert ran["argv"][-4:-1] == ["run", "--bundle", f"/var/lib/labkit/bundles/{host[4:]}"]
    assert not os.path.exists(f"/var/lib/labkit/bundles/{host[4:]}")
    assert not any(d.endswith(host) for d in cgroups.labkit_groups()[0])
    assert not any(host in ln for ln in open("/proc/self/mountinfo"))


def test_only_known_runtimes_run_bundles(lab):
    with pytest.raises(InvalidSpec):
        lab.run_bundle("busybox", runtime="/bin/sh")


def test_a_bundle_cannot_write_kernel_settings_and_is_killed_at_its_time(lab):
    """The bundle's /proc/sys is read-only and /proc/timer_list masked (runc's defaults: an image from a registry
    runs there as root; the host's timer_list holds kilobytes); a bundle that outlives its timeout is killed, its
    container deleted, nothing left."""
    assert os.path.getsize("/proc/timer_list") == 0 and len(open("/proc/timer_list").read()) > 0
    ran = lab.run_bundle("busybox", ["sh", "-c", "echo 1 > /proc/sys/kernel/printk_ratelimit && echo wrote; "
                                     "wc -c < /proc/timer_list"], runtime="runc")
    assert "wrote" not in ran["stdout"] and "Read-only file system" in ran["stderr"], ran
    assert ran["stdout"].strip() == "0"
    t = time.monotonic()
    slow = lab.run_bundle("busybox", ["sleep", "100"], runtime="runc", timeout=2)
    assert time.monotonic() - t < 30 and slow["exit_code"] != 0 and "killed after 2 s" in slow["facts"]["timed out"]
    assert subprocess.run(["pgrep", "-f", "^sleep 100$"], capture_output=True).returncode == 1
    with pytest.raises(InvalidSpec):
        lab.run_bundle("busybox", ["true"], timeout=601)
