"""Changing a process's root: chroot(2) alone, or pivot_root(2) in a private mount namespace.

``enter_root`` switches the caller into a labkit rootfs the way the spec says: with ``chroot`` only
``/`` moves (the mount namespace, and a way out, stay); with ``pivot_root`` the rootfs is bind-mounted
onto itself, receives the runtime's /proc, /sys and /dev, becomes the root of the private mount
namespace, and the old root is detached, as runc does. ``escape`` is the classic chroot breakout,
used by the labs to show that the first holds nothing and the second holds. Standard library only.
"""
import os

from ..wire.specs import rootfs_path
from . import kernel, rootfs
from .namespaces import look_around

ESCAPE_DIR = ".lk-escape"


def enter_root(spec, rec):
    """Switch into ``spec.rootfs`` (chroot or pivot_root), then chdir to ``spec.cwd``."""
    root = rootfs_path(spec.rootfs)
    if "mnt" in spec.namespaces:
        kernel.mount(root, root, None, kernel.MS_BIND | kernel.MS_REC, rec=rec)
        # Unless it keeps every capability (privileged), a process cannot use device nodes it makes in its
        # root or its volumes (nodev), as Docker's device allow-list ensures: its /dev holds the safe ones.
        nodev = spec.cap_keep is not None
        if nodev:
            kernel.remount_bind(root, kernel.MS_NODEV, rec=rec)
        rootfs.setup_runtime_mounts(root, rec, proc=spec.wants_proc, new_net="net" in spec.namespaces, nodev=nodev)
        if spec.proc_sys_ro and spec.wants_proc:  # the kernel's settings: look, do not touch (as Docker)
            for entry in ("sys", "sysrq-trigger"):
                path = f"{root}/proc/{entry}"
                if os.path.exists(path):
                    kernel.mount(path, path, None, kernel.MS_BIND, rec=rec)
                    kernel.remount_bind(path, kernel.MS_RDONLY, rec=rec)
        for src, dst, ro in spec.binds:  # -v HOST:CONTAINER[:ro]
            target = rootfs.place_in_root(root, dst, "dir" if os.path.isdir(src) else "file")
            kernel.mount(src, target, None, kernel.MS_BIND | kernel.MS_REC, rec=rec)
            if ro or nodev:
                kernel.remount_bind(target, (kernel.MS_RDONLY if ro else 0) | (kernel.MS_NODEV if nodev else 0),
                                    rec=rec)
    if spec.root_mode == "pivot_root":
        kernel.chdir(root, rec=rec)
        kernel.pivot_root(".", ".", rec=rec)          # the old root now sits on top of the new one
        kernel.umount2(".", kernel.MNT_DETACH, rec=rec)  # ... and is detached: no path leads back
        if spec.read_only:
            kernel.remount_bind("/", kernel.MS_RDONLY, rec=rec)
    else:
        kernel.chroot(root, rec=rec)
    kernel.chdir(spec.cwd, rec=rec)


def escape(rec, ctx):
    """The classic chroot escape: chroot into a subdirectory without chdir, climb '..', chroot('.').

    A read-only root does not stop it (any existing directory will do); what stops it is a root that
    is the top of its mount namespace (pivot_root), or no CAP_SYS_CHROOT: the view says which."""
    from ..wire.errors import MechanismError
    target = ESCAPE_DIR
    try:
        if not os.path.isdir("/" + ESCAPE_DIR):
            kernel.mkdir("/" + ESCAPE_DIR, rec=rec)
    except MechanismError:
        target = next((d for d in ("tmp", "etc", "bin") if os.path.isdir("/" + d)), ".")
    try:
        kernel.chroot(target, rec=rec)  # cwd stays outside the new root
    except MechanismError as exc:
        view = look_around(ctx)
        view["escaped"] = False
        view["escape_error"] = exc.message
        return view
    for _ in range(64):
        os.chdir("..")
    rec.syscall("chdir", ["'..'  (x64)"])
    kernel.chroot(".", rec=rec)
    view = look_around(ctx)
    view["escaped"] = view["host_files_visible"]
    return view


def remove_escape_dir(spec):
    try:
        os.rmdir(rootfs_path(spec.rootfs) + "/" + ESCAPE_DIR)
    except OSError:
        pass
