"""Container roots: the overlay root of one container, stacked from an image's layers in the store.

    containers/<id>/        upper/, work/ and merged/ of the overlay, and image.json: the image it was made from

A root is made from an image (:func:`mount_container_root`, :func:`create_container_root` for a bare root of
the lab), mounted again from its record after a reboot (:func:`ensure_mounted`), inspected
(:func:`upper_changes`), committed as the top layer of a new image (:func:`commit`) and removed. The engine's
containers, the builder's RUN steps and the lab's bare roots all stand on one. Its layers come from
:mod:`labkit.agent.store`, the mounts from :mod:`labkit.agent.overlay`. Standard library only.
"""
import os
import shutil
import time

from ..wire.errors import InvalidSpec, NotFound
from ..wire.specs import CONTAINERS_DIR, ImageRef, check_name
from . import overlay, store
from .runner import Recorder
from .state import private_dir, read_json, write_json


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
    lowers = [store.layer_dir(x) for x in reversed(layers)]  # overlay wants the top layer first
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
    image = store.load_image(ref)
    rec = Recorder(f"overlay root for {cid!r} from {ImageRef.parse(ref)}")
    merged = mount_container_root(image, cid, rec)
    write_json(f"{container_dir(cid)}/image.json", image)
    rec.fact("lowerdirs", [store.layer_dir(x) for x in reversed(image["layers"])])
    return rec.to_dict(id=cid, merged=merged, upper=f"{container_dir(cid)}/upper", image=image["ref"])


def container_root_info(cid):
    """The record of an overlay root made by :func:`create_container_root` that is still mounted (NotFound
    when there is none): what the grader finds by the name a notebook gave it."""
    check_name(cid, "container name")
    image = read_json(f"{container_dir(cid)}/image.json")
    merged = f"{container_dir(cid)}/merged"
    if not isinstance(image, dict) or not os.path.ismount(merged):
        raise NotFound(f"no mounted overlay root {cid!r}", fix=f"make it with lab.container_root(image, {cid!r})")
    rec = Recorder(f"overlay root of {cid!r}")
    rec.fact("lowerdirs", [store.layer_dir(x) for x in reversed(image.get("layers") or [])])
    return rec.to_dict(id=cid, merged=merged, upper=f"{container_dir(cid)}/upper", image=image.get("ref"))


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


def runtime_dirs_only(upper):
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
    if not store.is_image(meta):
        raise NotFound(f"no container {cid!r} with an overlay root", fix="start one with lab.container_root(...)")
    runtime_dirs_only(f"{d}/upper")
    digest, entries = store.add_layer_dir(f"{d}/upper")
    image = {"layers": meta["layers"] + [digest], "config": meta["config"],
             "history": meta.get("history", []) + [{"created_by": f"labkit commit: {message}"}],
             "created": time.time()}
    saved = store.save_image(ref, image)
    return {"image": saved, "layer": digest, "entries": entries}
