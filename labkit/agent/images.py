"""Images: content-addressed layers, images as ordered stacks of them, build with a cache, commit, OCI.

The store lives in /var/lib/labkit:

    blobs/sha256/<hex>      a layer's tar, named by its sha256 (the OCI diff_id)
    layers/sha256/<hex>/    the same layer unpacked (read-only by convention): an overlay lowerdir
    images/<name>/<tag>.json  {"layers": [digest, ...] bottom first, "config": {Env, Cmd, WorkingDir}, "history"}
    containers/<id>/        upper/, work/, merged/ of a container's overlay root
    buildcache/<key>.json   the image state after one recipe line, keyed by the parent state and the line

Layers come in only through :func:`labkit.agent.tarsafe.unpack` (digest verified, every entry checked),
so a layer made here and a layer from elsewhere are treated alike. Standard library only.
"""
import hashlib
import json
import os
import platform
import posixpath
import shlex
import shutil
import tempfile
import time

from ..wire.errors import BuildFailed, InvalidSpec, NotFound, UnsafeLayer
from ..wire.specs import CONTAINERS_DIR, DOCKER_DEFAULT_CAPS, STATE_DIR, ImageRef, ProcessSpec, check_name
from . import overlay, rootfs, tarsafe
from .runner import Recorder
from .state import private_dir, read_dir, read_json, write_json

BLOBS = STATE_DIR + "/blobs/sha256"
LAYERS = STATE_DIR + "/layers/sha256"
IMAGES = STATE_DIR + "/images"
CACHE = STATE_DIR + "/buildcache"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def _hex(digest):
    algo, _, h = digest.partition(":")
    if algo != "sha256" or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise InvalidSpec(f"{digest!r} is not a sha256 digest", fix="digests look like sha256:<64 hex digits>")
    return h


def layer_dir(digest):
    return os.path.join(LAYERS, _hex(digest))


def blob_path(digest):
    return os.path.join(BLOBS, _hex(digest))


def add_layer_tar(tar_path, digest=None, rec=None):
    """Take a layer tar into the store (verified and unpacked once); returns its digest. Device nodes the
    layer holds are left out (see :func:`labkit.agent.tarsafe.unpack`); they are listed in the layer's
    ``<hex>.json`` beside it and, when ``rec`` is given, in its facts as ``devices_skipped``."""
    private_dir(BLOBS)
    private_dir(LAYERS)
    digest = digest or tarsafe.sha256_file(tar_path)
    if not os.path.isdir(layer_dir(digest)):
        special = tarsafe.unpack(tar_path, layer_dir(digest), digest=digest)
        devices = [path for kind, path in special if kind == "device"]
        if devices:
            write_json(layer_dir(digest) + ".json", {"devices_skipped": devices})
    devices = skipped_devices(digest)
    if rec is not None and devices:
        rec.fact("devices_skipped", sorted(set(rec.facts.get("devices_skipped", [])) | set(devices)))
    if not os.path.exists(blob_path(digest)):
        tmp = f"{blob_path(digest)}.{os.getpid()}.{os.urandom(4).hex()}.tmp"  # two agents never share one
        try:
            shutil.copyfile(tar_path, tmp)
            os.replace(tmp, blob_path(digest))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return digest


def skipped_devices(digest):
    """The device nodes a stored layer held and the store left out ([] for most layers)."""
    meta = read_json(layer_dir(digest) + ".json", default={})
    return list(meta.get("devices_skipped", [])) if isinstance(meta, dict) else []


def add_layer_dir(src):
    """Pack a directory (an upper dir, or a tree to add) as a layer; returns (digest, entries)."""
    os.makedirs(STATE_DIR, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="layer-", suffix=".tar", dir=STATE_DIR)
    os.close(fd)
    try:
        digest, entries = tarsafe.pack(src, tmp)
        add_layer_tar(tmp, digest)
    finally:
        os.unlink(tmp)
    return digest, entries


# --- images --------------------------------------------------------------------------------------

def _image_path(ref):
    ref = ImageRef.parse(ref)
    return os.path.join(IMAGES, *ref.name.split("/"), ref.tag + ".json")


def save_image(ref, image):
    image = dict(image, ref=str(ImageRef.parse(ref)), id=image_id(image))
    write_json(_image_path(ref), image, indent=1)
    return image


def image_id(image):
    return "sha256:" + hashlib.sha256(json.dumps({"layers": image["layers"], "config": image["config"]},
                                                 sort_keys=True).encode()).hexdigest()


def load_image(ref):
    ref = ImageRef.parse(ref)
    image = read_json(_image_path(ref))
    if not _is_image(image):
        if str(ref) == "busybox:latest":
            return ensure_busybox()
        raise NotFound(f"no image {ref} on the target", fix="list them with lab.images(); build one or pull it")
    return image


def _is_image(image):
    return (isinstance(image, dict) and isinstance(image.get("layers"), list) and isinstance(image.get("config"), dict)
            and all(isinstance(d, str) for d in image["layers"]))


def in_root(path, cwd="/"):
    """``path`` as a container sees it: relative to ``cwd``, '..' stopped at the root, always absolute.
    Joined to a directory on the host it can only name something below that directory."""
    if not isinstance(path, str) or "\0" in path:
        raise InvalidSpec(f"{path!r} is not a path", fix="e.g. /app")
    if not path.startswith("/"):
        path = posixpath.join(cwd if isinstance(cwd, str) and cwd.startswith("/") else "/", path)
    return "/" + posixpath.normpath(path).lstrip("/")


def image_config(c, source):
    """The labkit config (Env, Cmd, WorkingDir) of an OCI/Docker image config's ``config`` object, checked:
    strings where strings belong, and an absolute WorkingDir. ``source`` names the image in errors."""
    c = c if isinstance(c, dict) else {}

    def strings(key):
        v = c.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) and "\0" not in x for x in v):
            raise InvalidSpec(f"{source}: the image's {key} must be a list of strings", fix="rebuild the image")
        return v
    env = strings("Env") or DEFAULT_ENV
    if any("=" not in e for e in env):
        raise InvalidSpec(f"{source}: every Env entry must be KEY=VALUE", fix="rebuild the image")
    wd = c.get("WorkingDir") or "/"
    if not isinstance(wd, str) or not wd.startswith("/"):
        raise InvalidSpec(f"{source}: the image's WorkingDir {wd!r} is not an absolute path",
                          fix="images must name their working directory from the root, e.g. /app (as Docker requires)")
    cmd = (strings("Entrypoint") or []) + (strings("Cmd") or []) or ["/bin/sh"]
    return {"Env": env, "Cmd": cmd, "WorkingDir": in_root(wd)}


def ensure_busybox():
    """The built-in image: one layer made from the target's static busybox (works offline)."""
    image = read_json(_image_path("busybox:latest"))
    if _is_image(image):
        return image
    rec = Recorder("build the busybox image")
    tmp = tempfile.mkdtemp(prefix="busybox-", dir=os.path.dirname(LAYERS) if os.path.isdir(LAYERS) else None)
    try:
        rootfs.populate(tmp, "labkit", rec)
        os.unlink(os.path.join(tmp, rootfs.MARKER))
        digest, _ = add_layer_dir(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return save_image("busybox:latest", {"layers": [digest], "config": {"Env": DEFAULT_ENV, "Cmd": ["/bin/sh"],
                                                                         "WorkingDir": "/"},
                                         "history": [{"created_by": "labkit: static busybox of the target"}],
                                         "created": time.time()})


def list_images():
    out = []
    if not os.path.isdir(IMAGES):
        return out
    for dirpath, _, _ in os.walk(IMAGES):
        for _, img in read_dir(dirpath):
            if _is_image(img) and "ref" in img:
                size = sum(os.path.getsize(blob_path(d)) for d in img["layers"] if os.path.exists(blob_path(d)))
                out.append({"ref": img["ref"], "id": img.get("id"), "layers": len(img["layers"]), "size": size,
                            "created": img.get("created")})
    return sorted(out, key=lambda i: i["ref"])


def tag(src, dst):
    return save_image(dst, load_image(src))


def rmi(ref):
    path = _image_path(ref)
    if not os.path.exists(path):
        raise NotFound(f"no image {ImageRef.parse(ref)}", fix="list them with lab.images()")
    os.unlink(path)
    return {"removed": str(ImageRef.parse(ref))}


# --- container roots -----------------------------------------------------------------------------

def container_dir(cid):
    return os.path.join(CONTAINERS_DIR, check_name(cid, "container id"))


def mount_container_root(image, cid, rec):
    """Overlay root for container ``cid`` from an image dict; returns the merged path."""
    d = container_dir(cid)
    if os.path.exists(d):
        raise InvalidSpec(f"container {cid!r} exists already", fix="remove it first or choose another name")
    private_dir(CONTAINERS_DIR)
    os.makedirs(d, mode=0o700)
    return ensure_mounted(cid, image["layers"], rec)


def ensure_mounted(cid, layers, rec):
    """Mount (again) the overlay root of ``cid``: its upper dir kept what it had before."""
    d = container_dir(cid)
    if os.path.ismount(f"{d}/merged"):
        return f"{d}/merged"
    lowers = [layer_dir(x) for x in reversed(layers)]  # overlay wants the top layer first
    for low in lowers:
        if not os.path.isdir(low):
            raise NotFound(f"layer {os.path.basename(low)[:12]} of the image is missing from the store",
                           fix="pull or build the image again")
    overlay.mount_root(lowers, f"{d}/upper", f"{d}/work", f"{d}/merged", rec)
    for sub in ("proc", "sys", "dev"):
        os.makedirs(f"{d}/merged/{sub}", exist_ok=True)  # runtime mount points (not part of any layer)
    return f"{d}/merged"


def create_container_root(ref, cid):
    """Mount an overlay root for a container of image ``ref``; returns its record (paths, layers)."""
    image = load_image(ref)
    rec = Recorder(f"overlay root for {cid!r} from {ImageRef.parse(ref)}")
    merged = mount_container_root(image, cid, rec)
    write_json(f"{container_dir(cid)}/image.json", image)
    rec.fact("lowerdirs", [layer_dir(x) for x in reversed(image["layers"])])
    return rec.to_dict(id=cid, merged=merged, upper=f"{container_dir(cid)}/upper", image=image["ref"])


def drop_container_root(cid):
    rec = Recorder(f"remove the overlay root of {cid!r}")
    remove_container_root(cid, rec)
    return rec.to_dict(id=cid)


def upper_changes(cid):
    return overlay.inspect_upper(f"{container_dir(cid)}/upper")


def remove_container_root(cid, rec):
    d = container_dir(cid)
    if os.path.ismount(f"{d}/merged"):
        overlay.unmount(f"{d}/merged", rec)
    shutil.rmtree(d, ignore_errors=True)


def _runtime_dirs_only(upper):
    """Remove the runtime mount points we created in the upper dir, if they are empty."""
    for sub in ("proc", "sys", "dev"):
        try:
            os.rmdir(os.path.join(upper, sub))
        except OSError:
            pass


def commit(cid, ref, message="commit"):
    """A container's upper directory becomes a new top layer of a new image."""
    d = container_dir(cid)
    meta = read_json(f"{d}/image.json")
    if not _is_image(meta):
        raise NotFound(f"no container {cid!r} with an overlay root", fix="start one with lab.container_root(...)")
    _runtime_dirs_only(f"{d}/upper")
    digest, entries = add_layer_dir(f"{d}/upper")
    image = {"layers": meta["layers"] + [digest], "config": meta["config"],
             "history": meta.get("history", []) + [{"created_by": f"labkit commit: {message}"}],
             "created": time.time()}
    saved = save_image(ref, image)
    return {"image": saved, "layer": digest, "entries": entries}


# --- build ---------------------------------------------------------------------------------------

def parse_recipe(text):
    """[(instruction, argument text)] from a Dockerfile-like recipe; continuation lines joined."""
    steps, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line, buf = (buf + line).strip(), ""
        word, _, arg = line.partition(" ")
        word = word.upper()
        if word not in ("FROM", "RUN", "COPY", "ENV", "WORKDIR", "CMD"):
            raise InvalidSpec(f"recipe line {line!r}: unknown instruction {word}",
                              fix="labkit knows FROM, RUN, COPY, ENV, WORKDIR and CMD")
        if not arg.strip():
            raise InvalidSpec(f"recipe line {line!r} has no argument", fix=f"e.g. {word} ...")
        steps.append((word, arg.strip()))
    if not steps or steps[0][0] != "FROM":
        raise InvalidSpec("a recipe starts with FROM", fix="e.g. FROM busybox")
    if any(w == "FROM" for w, _ in steps[1:]):
        raise InvalidSpec("only one FROM: multi-stage builds are not part of the course",
                          fix="keep a single FROM line at the top")
    return steps


def _json_or_shell(arg):
    if arg.startswith("["):
        try:
            v = json.loads(arg)
        except ValueError:
            raise InvalidSpec(f"{arg!r} is not a JSON list", fix='write CMD ["/bin/sh", "-c", "..."]') from None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise InvalidSpec(f"{arg!r} must be a list of strings", fix='e.g. ["httpd", "-f"]')
        return v
    return ["/bin/sh", "-c", arg]


def _key(parent, word, arg, extra=""):
    return hashlib.sha256(json.dumps([parent, word, arg, extra]).encode()).hexdigest()


def _context_hash(context, src):
    h = hashlib.sha256()
    for name in sorted(context):
        if name == src or name.startswith(src.rstrip("/") + "/") or src in (".", "./"):
            h.update(name.encode() + b"\0" + context[name].encode() + b"\0")
    return h.hexdigest()


def build(recipe, ref, context=None, no_cache=False):
    """Build ``recipe`` into image ``ref``; each line is one step, cached on (the image below it, the line).

    The image below is identified by its layers and config, so a line rebuilt without the cache (new
    layer digests) gives every line after it new keys as well."""
    ref = ImageRef.parse(ref)
    context = context or {}
    for name in context:
        if name.startswith("/") or ".." in name.split("/"):
            raise InvalidSpec(f"context file {name!r} must be a relative path without '..'",
                              fix="name files like 'app/index.html'")
    steps = parse_recipe(recipe)
    os.makedirs(CACHE, exist_ok=True)
    report, state, parent_key = [], None, ""
    started = time.perf_counter()
    for i, (word, arg) in enumerate(steps, 1):
        t0 = time.perf_counter()
        if word == "COPY":
            extra = _context_hash(context, shlex.split(arg)[0])
        elif word == "FROM":
            extra = load_image(arg)["id"]  # a rebuilt base image invalidates everything above it
        else:
            extra = ""
        key = _key(parent_key, word, arg, extra)
        cached = read_json(os.path.join(CACHE, key + ".json")) if not no_cache else None
        if _is_image(cached):
            state = cached
            if all(os.path.isdir(layer_dir(d)) for d in state["layers"]):
                report.append({"step": i, "line": f"{word} {arg}", "cached": True, "layer": state.get("new_layer"),
                               "seconds": time.perf_counter() - t0, "key": key})
                parent_key = image_id(state)
                continue
        state = _apply(word, arg, state, context, i)
        write_json(os.path.join(CACHE, key + ".json"), state)
        report.append({"step": i, "line": f"{word} {arg}", "cached": False, "layer": state.get("new_layer"),
                       "seconds": time.perf_counter() - t0, "key": key})
        parent_key = image_id(state)  # like Docker: the next line is keyed on the layers below it
    image = save_image(ref, {"layers": state["layers"], "config": state["config"], "history": state["history"],
                             "created": time.time()})
    return {"image": image, "steps": report, "seconds": time.perf_counter() - started,
            "rebuilt": [r["step"] for r in report if not r["cached"]]}


def _apply(word, arg, state, context, step):
    if word == "FROM":
        base = load_image(arg)
        return {"layers": list(base["layers"]), "config": dict(base["config"]),
                "history": list(base.get("history", [])) + [{"created_by": f"FROM {arg}", "empty_layer": True}],
                "new_layer": None}
    state = json.loads(json.dumps(state))
    state["new_layer"] = None
    cfg = state["config"]
    if word == "ENV":
        if "=" in arg.split()[0]:
            pairs = [kv.split("=", 1) for kv in shlex.split(arg)]
        else:
            k, _, v = arg.partition(" ")
            pairs = [[k, v.strip()]]
        env = [e for e in cfg.get("Env", []) if e.split("=", 1)[0] not in {k for k, _ in pairs}]
        cfg["Env"] = env + [f"{k}={v}" for k, v in pairs]
        state["history"].append({"created_by": f"ENV {arg}", "empty_layer": True})
        return state
    if word == "CMD":
        cfg["Cmd"] = _json_or_shell(arg)
        state["history"].append({"created_by": f"CMD {arg}", "empty_layer": True})
        return state
    with tempfile.TemporaryDirectory(prefix="step-", dir=STATE_DIR) as tree:
        if word == "WORKDIR":
            cfg["WorkingDir"] = in_root(arg, cfg.get("WorkingDir") or "/")
            os.makedirs(os.path.join(tree, cfg["WorkingDir"].lstrip("/")), exist_ok=True)
            digest, _ = add_layer_dir(tree)
        elif word == "COPY":
            parts = shlex.split(arg)
            if len(parts) != 2:
                raise InvalidSpec(f"COPY {arg}: write COPY <source in the context> <destination>",
                                  fix="e.g. COPY index.html /var/www/index.html")
            src, dst = parts
            names = [n for n in context if n == src or n.startswith(src.rstrip("/") + "/") or src in (".", "./")]
            if not names:
                raise BuildFailed(f"step {step}: COPY {arg}: {src!r} is not in the build context",
                                  fix="pass it in context={'" + src + "': '...'}")
            into_dir = dst.endswith("/")
            dst = in_root(dst, cfg.get("WorkingDir") or "/")  # '..' stops at the image's root, as in Docker
            for n in names:
                rel = n if src in (".", "./") else os.path.relpath(n, src) if n != src else ""
                target = in_root(dst.rstrip("/") + ("/" + rel if rel else ("/" + os.path.basename(n)
                                                                            if into_dir else "")))
                if target == "/":
                    raise BuildFailed(f"step {step}: COPY {arg}: the destination is the root itself",
                                      fix="name a file or a directory, e.g. COPY app /app/")
                full = os.path.join(tree, target.lstrip("/"))
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "w") as f:
                    f.write(context[n])
            digest, _ = add_layer_dir(tree)
        elif word == "RUN":
            digest = _run_step(state, arg, step)
    state["layers"].append(digest)
    state["new_layer"] = digest
    state["history"].append({"created_by": f"{word} {arg}"})
    return state


def _run_step(state, arg, step):
    from . import process
    cid = "build-" + hashlib.sha256(f"{arg}{time.time()}".encode()).hexdigest()[:10]
    rec = Recorder(f"RUN {arg}")
    merged = mount_container_root(state, cid, rec)
    try:
        cfg = state["config"]
        env = dict(e.split("=", 1) for e in cfg.get("Env", []))
        spec = ProcessSpec(argv=("/bin/sh", "-c", arg), namespaces=("uts", "pid", "mnt", "ipc", "net"),
                           rootfs=merged, root_mode="pivot_root", env=tuple(sorted(env.items())),
                           cwd=in_root(cfg.get("WorkingDir") or "/"), hostname="build",
                           # a recipe is untrusted input: its RUN lines get what a `docker run` gets
                           cap_keep=tuple(DOCKER_DEFAULT_CAPS), proc_sys_ro=True)
        res = process.run(spec.to_dict(), timeout=600)
        if res["exit_code"] != 0:
            tail = (res["stderr"] or res["stdout"])[-600:]
            raise BuildFailed(f"step {step}: RUN {arg} exited with {res['exit_code']}:\n{tail}",
                              fix="fix the command (it runs in /bin/sh inside the image, without network)")
        overlay.unmount(merged, rec)
        _runtime_dirs_only(f"{container_dir(cid)}/upper")
        digest, _ = add_layer_dir(f"{container_dir(cid)}/upper")
        return digest
    finally:
        remove_container_root(cid, rec)


def prune(cache_keys=None, all_cache=False):
    """Forget build-cache entries (the given keys, or all), then delete layers nothing refers to."""
    removed_cache = 0
    if os.path.isdir(CACHE):
        for fn in os.listdir(CACHE):
            if all_cache or (cache_keys and fn[:-5] in set(cache_keys)):
                os.unlink(os.path.join(CACHE, fn))
                removed_cache += 1
    used = set()
    entries = [img for dirpath, _, _ in (os.walk(IMAGES) if os.path.isdir(IMAGES) else ()) for _, img in read_dir(dirpath)]
    for cid in os.listdir(CONTAINERS_DIR) if os.path.isdir(CONTAINERS_DIR) else ():
        entries.append(read_json(f"{CONTAINERS_DIR}/{cid}/image.json"))
    entries += [img for _, img in read_dir(CACHE)]
    for img in entries:
        if _is_image(img):
            used.update(img["layers"])
    used |= _mounted_layers()  # a live root keeps its layers even when its image.json is lost or garbled
    removed, freed = [], 0
    for h in sorted(os.listdir(LAYERS)) if os.path.isdir(LAYERS) else []:
        digest = "sha256:" + h.split(".")[0]
        if digest in used or "." in h:
            continue
        freed += os.path.getsize(blob_path(digest)) if os.path.exists(blob_path(digest)) else 0
        shutil.rmtree(layer_dir(digest), ignore_errors=True)
        for path in (blob_path(digest), layer_dir(digest) + ".json"):
            if os.path.exists(path):
                os.unlink(path)
        removed.append(digest)
    return {"layers_removed": removed, "cache_entries_removed": removed_cache, "bytes_freed": freed}


def _mounted_layers():
    """The layers every overlay mounted now stacks (read from the kernel's mount table, not from state)."""
    out = set()
    for line in (open("/proc/self/mountinfo").read().splitlines()):
        pre, _, post = line.partition(" - ")
        fields = post.split()
        if len(fields) < 3 or fields[0] != "overlay":
            continue
        for opt in fields[2].split(","):
            if opt.startswith("lowerdir="):
                for low in opt[len("lowerdir="):].split(":"):
                    if os.path.dirname(low) == LAYERS:
                        out.add("sha256:" + os.path.basename(low))
    return out


# --- OCI image layout ----------------------------------------------------------------------------

def _write_blob(layout, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", _hex(digest))
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


def export_oci(ref, dest):
    """Write image ``ref`` as an OCI image layout directory (index.json, blobs) at ``dest``."""
    image = load_image(ref)
    if os.path.exists(dest) and os.listdir(dest):
        raise InvalidSpec(f"{dest} exists and is not empty", fix="export into a new directory")
    os.makedirs(os.path.join(dest, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(dest, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layers = []
    for d in image["layers"]:
        shutil.copyfile(blob_path(d), os.path.join(dest, "blobs", "sha256", _hex(d)))
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d,
                       "size": os.path.getsize(blob_path(d))})
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
    path = os.path.join(layout, "blobs", "sha256", _hex(digest))
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
        path = os.path.join(src, "blobs", "sha256", _hex(desc["digest"]))
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
                layers.append(add_layer_tar(tar, want))
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            layers.append(add_layer_tar(path, desc["digest"]))
    image = {"layers": layers, "config": image_config(config.get("config"), f"{src}"),
             "history": config.get("history", []), "created": time.time()}
    return save_image(ref, image)
