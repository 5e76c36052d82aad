"""OCI image layouts in and out: an image of the store written as a layout directory (oci-layout, index.json,
blobs/sha256/...) and a layout read back into the store, every blob's digest verified; and the OCI image
config of a stored image (what :mod:`labkit.agent.registry` pushes too). skopeo reads and writes these
layouts (``oci:DIR:TAG``). And the OCI *runtime* spec's side: a bundle (a root filesystem and its config.json)
made from a stored image and run by a low-level runtime, runc or crun (:func:`run_bundle`). Standard library only.
"""
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time

from ..wire.errors import InvalidSpec, NotFound, UnsafeLayer
from ..wire.specs import STATE_DIR, ImageRef
from . import store, tarsafe
from .state import read_json

OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def _write_blob(layout, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", store.digest_hex(digest))
    with open(path, "wb") as f:
        f.write(data)
    return digest, len(data)


def oci_config(image):
    arch = OCI_ARCH.get(platform.machine(), platform.machine())
    cfg = image["config"]
    return {"architecture": arch, "os": "linux", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
        image.get("created") or 0)),
            "config": {k: v for k, v in (("Env", cfg.get("Env")), ("Cmd", cfg.get("Cmd")),
                                           ("WorkingDir", cfg.get("WorkingDir"))) if v},
            "rootfs": {"type": "layers", "diff_ids": list(image["layers"])},
            "history": image.get("history", [])}


#: what a container's root may not write or read under /proc and /sys (runc's own defaults): kernel settings,
#: the magic SysRq key, the kernel's memory and keys
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
MASKED_PATHS = ("/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware")


def runtime_config(root, cgroups_path, args=("/bin/true",), env=("PATH=/usr/sbin:/usr/bin:/sbin:/bin",), cwd="/",
                   hostname="bench", user=(0, 0)):
    """A runtime-spec config.json (OCI runtime spec 1.0.2) for ``root``: the process (as ``user``, no new
    privileges, two capabilities), its mounts (/proc's kernel settings read-only and its secrets masked, as runc
    does by default), namespaces, cgroup and a pids limit."""
    return {"ociVersion": "1.0.2", "root": {"path": root, "readonly": False},
            "process": {"terminal": False, "user": {"uid": user[0], "gid": user[1]}, "args": list(args), "cwd": cwd,
                        "env": list(env), "noNewPrivileges": True,
                        "capabilities": {k: ["CAP_KILL", "CAP_NET_BIND_SERVICE"] for k in
                                         ("bounding", "effective", "permitted")}},
            "hostname": hostname,
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                       {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", "nosuid", "noexec"]}],
            "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "uts", "ipc", "network")],
                      "cgroupsPath": cgroups_path, "resources": {"pids": {"limit": 64}},
                      "readonlyPaths": list(READONLY_PATHS), "maskedPaths": list(MASKED_PATHS)}}


RUNTIMES = ("crun", "runc")


def runtime_argv(runtime, *args):
    """``RUNTIME ARGS`` as it runs here (``"run", "--bundle", DIR``, say; append the container's id); None when it
    is not installed. crun refuses hybrid cgroups, so there it runs with the almost empty cgroup2 mount hidden in
    a private mount namespace."""
    from . import cgroups
    from .runner import which
    exe = which(runtime)
    if not exe:
        return None
    cmd = [exe, *args]
    if runtime == "crun" and cgroups.detect()["mode"] == "hybrid":
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'umount /sys/fs/cgroup/unified && exec "$@"', "sh"] + cmd
    return cmd


MAX_BUNDLE_OUTPUT = 64 << 10


def run_bundle(ref, argv=None, runtime="crun", timeout=60):
    """Run image ``ref`` the OCI runtime spec's way: an overlay root of it, a bundle directory (``config.json``
    from the image's command, user, environment and working directory, and the root), and ``RUNTIME run
    --bundle``, for at most ``timeout`` seconds (1 to 600; then it is killed); everything removed afterwards,
    the container too. Returns {'runtime', 'argv', 'config', 'exit_code', 'stdout', 'stderr' (at most 64 KiB
    each), 'steps'}."""
    import secrets
    import subprocess
    from ..wire.errors import MechanismError
    from ..wire.specs import argv_tuple, check_user
    from . import cgroups, roots
    from .runner import Recorder, run, start
    if runtime not in RUNTIMES:
        raise InvalidSpec(f"{runtime!r} is not an OCI runtime labkit knows", fix="runtime='crun' or 'runc'")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 1 <= timeout <= 600:
        raise InvalidSpec(f"timeout={timeout!r} must be 1 to 600 seconds", fix="e.g. timeout=60")
    image = store.load_image(ref)
    cfg = image["config"]
    args = list(argv_tuple(argv)) if argv else list(cfg.get("Cmd") or ["/bin/sh"])
    uid, _, gid = check_user(cfg["User"]).partition(":") if cfg.get("User") else ("0", "", "0")
    rid = secrets.token_hex(4)
    cid, bundle = f"oci-{rid}", f"{STATE_DIR}/bundles/{rid}"
    rec = Recorder(f"{runtime} runs {ref} from an OCI bundle")
    cmd = runtime_argv(runtime, "run", "--bundle", bundle)
    if cmd is None:
        raise MechanismError(f"{runtime} is not installed on the target", fix=f"apt-get install {runtime} "
                             "(scripts/setup.sh and the lab VM install crun and runc)")
    root = None
    out = {}
    try:
        root = roots.create_container_root(ref=ref, cid=cid)
        rec.steps += root["steps"]
        os.makedirs(bundle, mode=0o700)
        config = runtime_config(root["merged"], f"/labkit/{cid}", args=args,
                                env=cfg.get("Env") or ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                                cwd=cfg.get("WorkingDir") or "/", hostname=cid, user=(int(uid), int(gid or uid)))
        with open(f"{bundle}/config.json", "w") as f:
            json.dump(config, f, indent=1)
        rec.file("write", f"{bundle}/config.json")
        files = {k: open(f"{bundle}/{k}", "w+b") for k in ("stdout", "stderr")}  # (bounded when read back)
        try:
            proc = start(cmd + [cid], stdout=files["stdout"], stderr=files["stderr"], recorder=rec)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                rec.fact("timed out", f"killed after {timeout} s")
            for k, f in files.items():
                f.seek(0)
                out[k] = f.read(MAX_BUNDLE_OUTPUT).decode("utf-8", "replace")
        finally:
            for f in files.values():
                f.close()
    finally:
        gone = runtime_argv(runtime, "delete", "--force", cid)  # (the runtime's own record of it, and whatever runs)
        if gone is not None:
            run(gone, check=False, timeout=30)
        if root is not None:
            roots.drop_container_root(cid=cid)
        for d in cgroups.labkit_groups()[0]:  # the runtime's own cgroup, made under labkit's parent
            if d.endswith(f"/{cid}"):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        shutil.rmtree(bundle, ignore_errors=True)
    return rec.to_dict(runtime=runtime, argv=cmd + [cid], config=config, exit_code=code, **out)


def export_oci(ref, dest):
    """Write image ``ref`` as an OCI image layout directory (index.json, blobs) at ``dest``."""
    image = store.load_image(ref)
    if os.path.exists(dest) and os.listdir(dest):
        raise InvalidSpec(f"{dest} exists and is not empty", fix="export into a new directory")
    os.makedirs(os.path.join(dest, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(dest, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layers = []
    for d in image["layers"]:
        shutil.copyfile(store.blob_path(d), os.path.join(dest, "blobs", "sha256", store.digest_hex(d)))
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d,
                       "size": os.path.getsize(store.blob_path(d))})
    cdigest, csize = _write_blob(dest, json.dumps(oci_config(image), sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
                "layers": layers}
    mdigest, msize = _write_blob(dest, json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
                            "size": msize, "annotations": {"org.opencontainers.image.ref.name":
                                                           ImageRef.parse(ref).tag}}]}
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump(index, f)
    return {"path": dest, "manifest": mdigest, "config": cdigest, "layers": [x["digest"] for x in layers]}


def _read_blob(layout, digest, limit=64 << 20):
    path = os.path.join(layout, "blobs", "sha256", store.digest_hex(digest))
    if not os.path.isfile(path):
        raise NotFound(f"blob {digest} is missing from {layout}", fix="the layout is incomplete: export it again")
    got = tarsafe.sha256_file(path)
    if got != digest:
        raise UnsafeLayer(f"blob {digest} in {layout} has the content of {got}",
                                  fix="the layout was modified or corrupted: do not use it")
    if os.path.getsize(path) > limit:
        raise InvalidSpec(f"blob {digest} is too large for a manifest or config")
    return path


def import_oci(src, ref, tag_name=None):
    """Import an OCI image layout directory as image ``ref`` (every blob's digest verified)."""
    index = read_json(os.path.join(src, "index.json"), default={})
    mans = (index.get("manifests") if isinstance(index, dict) else None) or []
    if tag_name:
        mans = [m for m in mans if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag_name]
    if not mans:
        raise NotFound(f"{src} holds no image manifest" + (f" tagged {tag_name!r}" if tag_name else ""),
                       fix="export one with lab.export_image(...) or `skopeo copy ... oci:DIR:TAG`")
    manifest = json.loads(open(_read_blob(src, mans[0]["digest"])).read())
    if manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json") == \
            "application/vnd.oci.image.index.v1+json":
        raise InvalidSpec("multi-platform indexes are handled by `labkit pull`", fix="export a single image")
    config = json.loads(open(_read_blob(src, manifest["config"]["digest"])).read())
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    layers = []
    for i, desc in enumerate(manifest.get("layers", [])):
        path = os.path.join(src, "blobs", "sha256", store.digest_hex(desc["digest"]))
        if not os.path.isfile(path):
            raise NotFound(f"layer blob {desc['digest']} is missing from {src}")
        if tarsafe.sha256_file(path) != desc["digest"]:
            raise UnsafeLayer(f"layer {desc['digest']} does not match its digest",
                                      fix="the layout was modified or corrupted: do not use it")
        mt = desc.get("mediaType", "")
        if mt.endswith("+gzip") or mt.endswith(".gzip"):
            work = tempfile.mkdtemp(prefix="import-", dir=STATE_DIR)
            try:
                tar = os.path.join(work, "layer.tar")
                tarsafe.gunzip_bounded(path, tar, tarsafe.gunzip_limit(os.path.getsize(path)), f"layer {i + 1}")
                want = diff_ids[i] if i < len(diff_ids) else None
                layers.append(store.add_layer_tar(tar, want))
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            layers.append(store.add_layer_tar(path, desc["digest"]))
    image = {"layers": layers, "config": store.image_config(config.get("config"), f"{src}"),
             "history": config.get("history", []), "created": time.time()}
    return store.save_image(ref, image)
