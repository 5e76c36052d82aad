"""The builder: a Dockerfile-like recipe (FROM, RUN, COPY, ENV, WORKDIR, CMD) into an image, a layer per step.

Each line is one step, and its result (the image state after it) is kept in the build cache
(``buildcache/<key>.json`` in :mod:`labkit.agent.store`), keyed by the state below it and the line: for FROM
also the base image's id, for COPY the files of the context it copies. A RUN line runs in a container root
(:mod:`labkit.agent.roots`) of the state below it, with what a `docker run` gets, and its upper directory
becomes the step's layer. Standard library only.
"""
import hashlib
import json
import os
import shlex
import tempfile
import time

from ..wire.errors import BuildFailed, InvalidSpec
from ..wire.arch import DOCKER_DEFAULT_CAPS
from ..wire.specs import STATE_DIR, ImageRef, ProcessSpec
from . import overlay, process, roots, store
from .runner import Recorder
from .state import read_json, write_json


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
    layer digests) gives every line after it new keys as well. The store's lock is held shared throughout:
    a prune waits, so no layer this build made or took from its cache goes before its image names it."""
    with store.locked(shared=True):
        return _build(recipe, ref, context, no_cache)


def _build(recipe, ref, context, no_cache):
    ref = ImageRef.parse(ref)
    context = context or {}
    for name in context:
        if name.startswith("/") or ".." in name.split("/"):
            raise InvalidSpec(f"context file {name!r} must be a relative path without '..'",
                              fix="name files like 'app/index.html'")
    steps = parse_recipe(recipe)
    os.makedirs(store.CACHE, exist_ok=True)
    report, state, parent_key = [], None, ""
    started = time.perf_counter()
    for i, (word, arg) in enumerate(steps, 1):
        t0 = time.perf_counter()
        if word == "COPY":
            extra = _context_hash(context, shlex.split(arg)[0])
        elif word == "FROM":
            extra = store.load_image(arg)["id"]  # a rebuilt base image invalidates everything above it
        else:
            extra = ""
        key = _key(parent_key, word, arg, extra)
        cached = read_json(os.path.join(store.CACHE, key + ".json")) if not no_cache else None
        if store.is_image(cached):
            state = cached
            if all(os.path.isdir(store.layer_dir(d)) for d in state["layers"]):
                report.append({"step": i, "line": f"{word} {arg}", "cached": True, "layer": state.get("new_layer"),
                               "seconds": time.perf_counter() - t0, "key": key})
                parent_key = store.image_id(state)
                continue
        state = _apply(word, arg, state, context, i)
        write_json(os.path.join(store.CACHE, key + ".json"), state)
        report.append({"step": i, "line": f"{word} {arg}", "cached": False, "layer": state.get("new_layer"),
                       "seconds": time.perf_counter() - t0, "key": key})
        parent_key = store.image_id(state)  # like Docker: the next line is keyed on the layers below it
    image = store.save_image(ref, {"layers": state["layers"], "config": state["config"], "history": state["history"],
                             "created": time.time()})
    return {"image": image, "steps": report, "seconds": time.perf_counter() - started,
            "rebuilt": [r["step"] for r in report if not r["cached"]]}


def _apply(word, arg, state, context, step):
    if word == "FROM":
        base = store.load_image(arg)
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
            cfg["WorkingDir"] = store.in_root(arg, cfg.get("WorkingDir") or "/")
            os.makedirs(os.path.join(tree, cfg["WorkingDir"].lstrip("/")), exist_ok=True)
            digest, _ = store.add_layer_dir(tree)
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
            dst = store.in_root(dst, cfg.get("WorkingDir") or "/")  # '..' stops at the image's root, as in Docker
            for n in names:
                rel = n if src in (".", "./") else os.path.relpath(n, src) if n != src else ""
                target = store.in_root(dst.rstrip("/") + ("/" + rel if rel else ("/" + os.path.basename(n)
                                                                            if into_dir else "")))
                if target == "/":
                    raise BuildFailed(f"step {step}: COPY {arg}: the destination is the root itself",
                                      fix="name a file or a directory, e.g. COPY app /app/")
                full = os.path.join(tree, target.lstrip("/"))
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "w") as f:
                    f.write(context[n])
            digest, _ = store.add_layer_dir(tree)
        elif word == "RUN":
            digest = _run_step(state, arg, step)
    state["layers"].append(digest)
    state["new_layer"] = digest
    state["history"].append({"created_by": f"{word} {arg}"})
    return state


def _run_step(state, arg, step):
    cid = "build-" + hashlib.sha256(f"{arg}{time.time()}".encode()).hexdigest()[:10]
    rec = Recorder(f"RUN {arg}")
    merged = roots.mount_container_root(state, cid, rec)
    try:
        cfg = state["config"]
        env = dict(e.split("=", 1) for e in cfg.get("Env", []))
        spec = ProcessSpec(argv=("/bin/sh", "-c", arg), namespaces=("uts", "pid", "mnt", "ipc", "net"),
                           rootfs=merged, root_mode="pivot_root", env=tuple(sorted(env.items())),
                           cwd=store.in_root(cfg.get("WorkingDir") or "/"), hostname="build",
                           # a recipe is untrusted input: its RUN lines get what a `docker run` gets
                           cap_keep=tuple(DOCKER_DEFAULT_CAPS), proc_sys_ro=True)
        res = process.run(spec, timeout=600)
        if res["exit_code"] != 0:
            tail = (res["stderr"] or res["stdout"])[-600:]
            raise BuildFailed(f"step {step}: RUN {arg} exited with {res['exit_code']}:\n{tail}",
                              fix="fix the command (it runs in /bin/sh inside the image, without network)")
        overlay.unmount(merged, rec)
        roots.runtime_dirs_only(f"{roots.container_dir(cid)}/upper")
        digest, _ = store.add_layer_dir(f"{roots.container_dir(cid)}/upper")
        return digest
    finally:
        roots.remove_container_root(cid, rec)
