"""The image store: content-addressed layer blobs, their unpacked trees, image records, tags, and prune.

The store lives in /var/lib/labkit:

    blobs/sha256/<hex>      a layer's tar, named by its sha256 (the OCI diff_id)
    layers/sha256/<hex>/    the same layer unpacked (read-only by convention): an overlay lowerdir
    images/<name>/<tag>.json  {"layers": [digest, ...] bottom first, "config": {Env, Cmd, WorkingDir}, "history"}
    buildcache/<key>.json   the builder's cache entries (:mod:`labkit.agent.build`), image states like the above

Layers come in only through :func:`labkit.agent.tarsafe.unpack` (digest verified, every entry checked),
so a layer made here and a layer from elsewhere are treated alike. The built-in ``busybox`` image is made
here from the target's static busybox. :func:`prune` deletes the layers that nothing refers to: no image
record, no build cache entry, no container root's record (:mod:`labkit.agent.roots`) and no mounted overlay.
:func:`locked` is the store's lock, across every agent process and daemon thread: prune and a pull's storing
phase hold it alone; a build holds it shared from its first step to its image record, so that the layers it
made or found in its cache are never pruned from under it.
Container roots are :mod:`labkit.agent.roots`, the builder :mod:`labkit.agent.build`, OCI image layouts
:mod:`labkit.agent.oci`. Standard library only.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time

from ..wire.errors import Conflict, InvalidSpec, NotFound, UnsafeLayer
from ..wire.specs import CONTAINERS_DIR, STATE_DIR, ImageRef
from . import rootfs, tarsafe
from .runner import Recorder
from .state import private_dir, read_dir, read_json, write_json

BLOBS = STATE_DIR + "/blobs/sha256"
LAYERS = STATE_DIR + "/layers/sha256"
IMAGES = STATE_DIR + "/images"
CACHE = STATE_DIR + "/buildcache"
LOCK = STATE_DIR + "/store.lock"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


def digest_hex(digest):
    algo, _, h = digest.partition(":")
    if algo != "sha256" or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise InvalidSpec(f"{digest!r} is not a sha256 digest", fix="digests look like sha256:<64 hex digits>")
    return h


def layer_dir(digest):
    return os.path.join(LAYERS, digest_hex(digest))


def blob_path(digest):
    return os.path.join(BLOBS, digest_hex(digest))


def add_layer_tar(tar_path, digest=None, rec=None):
    """Take a layer tar into the store (verified and unpacked once); returns its digest. Device nodes the
    layer holds are left out (see :func:`labkit.agent.tarsafe.unpack`); they are listed in the layer's
    ``<hex>.json`` beside it and, when ``rec`` is given, in its facts as ``devices_skipped``."""
    private_dir(BLOBS)
    private_dir(LAYERS)
    checked = digest is None  # (the bytes are their digest) or, below, unpacked against it
    digest = digest or tarsafe.sha256_file(tar_path)
    if not os.path.isdir(layer_dir(digest)):
        try:
            special = tarsafe.unpack(tar_path, layer_dir(digest), digest=digest)
            checked = True
        except InvalidSpec:
            if not os.path.isdir(layer_dir(digest)):
                raise
            special = []  # another build or pull stored this very layer a moment ago: it is here, checked
        devices = [path for kind, path in special if kind == "device"]
        if devices:
            write_json(layer_dir(digest) + ".json", {"devices_skipped": devices})
    devices = skipped_devices(digest)
    if rec is not None and devices:
        rec.fact("devices_skipped", sorted(set(rec.facts.get("devices_skipped", [])) | set(devices)))
    if not os.path.exists(blob_path(digest)):
        if not checked and tarsafe.sha256_file(tar_path) != digest:  # (its layer was here: these bytes, unread)
            raise UnsafeLayer(f"the bytes given as layer {digest} are not that layer",
                              fix="the copy is damaged or mislabelled: fetch or send it again")
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


def read_image(ref):
    """The image record of ``ref`` as stored, or None (no built-in busybox made for it)."""
    image = read_json(_image_path(ref))
    return image if is_image(image) else None


def load_image(ref):
    ref = ImageRef.parse(ref)
    image = read_json(_image_path(ref))
    if not is_image(image):
        if str(ref) == "busybox:latest":
            return ensure_busybox()
        raise NotFound(f"no image {ref} on the target", fix="list them with lab.images(); build one or pull it")
    return image


def is_image(image):
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
    if is_image(image):
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
            if is_image(img) and "ref" in img:
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


@contextlib.contextmanager
def locked(shared=False, wait=True):
    """The store's lock (flock on :data:`LOCK`): held alone (``shared`` False) by what removes layers or stores
    a pull's, held shared by builds and pushes. Each holder opens the file itself, so threads of one daemon
    exclude each other as separate processes do. ``wait`` False: a Conflict at once when another holds it."""
    os.makedirs(STATE_DIR, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Conflict("the image store is busy: a build, a pull or a push is using its layers",
                           fix="try again when it has ended") from None
        yield
    finally:
        os.close(fd)  # (closing the last descriptor of the open file releases its lock)


# --- prune ---------------------------------------------------------------------------------------

def prune(cache_keys=None, all_cache=False):
    """Forget build-cache entries (the given keys, or all), then delete layers nothing refers to (holding the
    store's lock: never a layer a pull is storing or a build is using; refused, not queued, while one is, so
    that a daemon does not wait behind a long build)."""
    with locked(wait=False):
        return _prune(cache_keys, all_cache)


def _prune(cache_keys, all_cache):
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
        if is_image(img):
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
