"""The ``labkit`` command: doctor, cleanup, lab (run the notebooks headless), scores, bench, assign, and docker-like verbs
(lab 09's clusters too, with Docker Swarm's node, service and stack verbs).

Mirrors what a notebook does with ``labkit.connect()``; exits non-zero with the error's fix on failure.
"""
import argparse
import json
import os
import sys

from . import __version__
from .wire.errors import InvalidSpec, LabkitError, NotFound
from .course import NOTEBOOK_DIR


def _lab(args):
    from . import connect
    return connect(args.target)


def cmd_doctor(args):
    rep = _lab(args).doctor()
    print(json.dumps(rep.lines, indent=1) if args.json else rep.text())
    return 0 if rep["ok"] else 1


def _on_this_machine(args):
    return args.target in ("auto", "local") and sys.platform.startswith("linux") and os.geteuid() == 0


def cmd_cleanup(args):
    if _on_this_machine(args):  # the daemon first (its containers stay up without it): then cleanup runs here
        from .agent.local import daemon_control
        running = daemon_control("status")
        if running:
            print(("would stop " if args.dry_run else "stopped ") + f"labkit's daemon (pid {running['pid']})")
            if not args.dry_run:
                daemon_control("stop")
        os.environ["LABKIT_DAEMON"] = "off"
    rec = _lab(args).cleanup(dry_run=args.dry_run)
    items = rec.facts.get("found", []) if args.dry_run else rec.get("removed", [])
    for item in items:
        print(("would remove " if args.dry_run else "removed ") + item)
    left = rec.facts.get("left") or []
    for item in left:
        print("could not remove " + item, file=sys.stderr)
    return 1 if left else 0


def cmd_lab(args):
    from .course.runbook import pick_notebooks, run_notebooks
    source = NOTEBOOK_DIR
    if args.lang != "en":
        from .course.translate import edition_dir
        source = edition_dir(args.lang)
    if args.student:
        from .course.assign import write_student_editions
        origin, source = source, os.path.join(args.output, "student-editions")
        write_student_editions(origin, source)
    edition = "student editions (blank: every question scores zero, with its reason)" if args.student else \
        "solution editions"
    if args.lang != "en":
        edition += f", in {args.lang} (the same code and checks, the prose translated)"
    chosen = pick_notebooks(args.notebooks, source) if args.notebooks else None
    print(f"labkit {__version__}: executing the notebooks ({edition}) on target {args.target!r} "
          f"({'full' if args.full else 'quick'} mode) into {os.path.abspath(args.output)}", flush=True)
    runs = run_notebooks(args.target, args.output, chosen, quick=not args.full, lang=args.lang,
                         source_dir=source, on_done=lambda run: print(run.line(), flush=True))
    return _totals(runs, args.output)


def _die_with_parent():
    """In JupyterLab's child before exec: SIGTERM it when this command dies, however it dies (a SIGKILL too:
    it runs in a session of its own, so nothing else would reach it). Linux only; elsewhere Ctrl-C does it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


def cmd_jupyter(args):
    """JupyterLab on the course, for a lecture or a student: the right target, a fresh token, Ctrl-C stops it."""
    import secrets
    import signal
    import subprocess
    root = os.path.abspath(args.dir) if args.dir else NOTEBOOK_DIR
    if args.student:
        from .course.assign import write_student_editions
        root = os.path.abspath(args.dir or "labkit-course")
        write_student_editions(NOTEBOOK_DIR, root, keep=True)
    if not os.path.isdir(root):
        raise NotFound(f"{root} is not a folder of notebooks", fix="give --dir a folder, or --student to make one")
    token = secrets.token_urlsafe(24)
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.ip={args.ip}",
            f"--ServerApp.port={args.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    env = dict(os.environ, LABKIT_TARGET=args.target)
    env.pop("LABKIT_HEADLESS", None)  # someone clicks here: step widgets wait for Next
    config = None
    if args.big_screen:  # the projector: big type on the page (JupyterLab's custom.css) and in every chart
        import tempfile
        from .course.plotting import BIG_SCREEN_CSS
        config = tempfile.mkdtemp(prefix="labkit-jupyter-")
        os.makedirs(os.path.join(config, "custom"))
        with open(os.path.join(config, "custom", "custom.css"), "w") as f:
            f.write(BIG_SCREEN_CSS)
        env.update(LABKIT_BIG_SCREEN="1", JUPYTER_CONFIG_DIR=config)
        argv.append("--LabApp.custom_css=True")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://{args.ip}:{args.port}/lab?token={token}"
    try:
        for line in proc.stderr:  # JupyterLab says when it serves (or why it cannot)
            if "is running at" in line or "http://" in line and "token=" in line:
                break
            if args.verbose:
                print(line, end="", file=sys.stderr)
        import socket
        import time
        deadline = time.monotonic() + 60
        while proc.poll() is None:  # it says where it will be a moment before it listens there
            try:
                socket.create_connection((args.ip, args.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        if proc.poll() is not None:
            raise LabkitError(f"JupyterLab did not start (exit {proc.returncode})",
                              fix=f"is port {args.port} taken? try --port {args.port + 1}")
        print(f"JupyterLab on {root}, target {args.target!r}:\n  {url}\nCtrl-C stops it (and undoes every step widget's "
              "sequence in its kernels).", flush=True)
        for line in proc.stderr:
            if args.verbose:
                print(line, end="", file=sys.stderr)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server shuts its kernels down: their sequences undo
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if config:
            import shutil
            shutil.rmtree(config, ignore_errors=True)


def _totals(runs, output):
    got = sum(r.total[0] for r in runs)
    out_of = sum(r.total[1] for r in runs)
    failed = [r.name for r in runs if r.error]
    secs = sum(r.seconds or 0 for r in runs)
    print(f"{'all':<30} {got:5g}/{out_of:<4g} points  {secs:6.1f} s"
          + (f"  ({len(failed)} failed: {', '.join(failed)})" if failed else ""))
    print(f"executed notebooks and charts are in {os.path.abspath(output)}")
    return 1 if failed else 0


def cmd_scores(args):
    from .course.runbook import course_notebooks, read_runs
    runs = read_runs(args.output, expected=course_notebooks() if args.all else None)
    if not runs:
        raise NotFound(f"no executed notebooks in {args.output}", fix="run `labkit lab --output DIR` first")
    for run in runs:
        print(run.line())
    code = _totals(runs, args.output)
    short = [r.name for r in runs if not r.full]
    if args.require_full and short:
        print(f"not full points: {', '.join(short)}", file=sys.stderr)
        return 1
    return code


# --- the docker-like verbs -----------------------------------------------------------------------

def _kv(pairs):
    out = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep:
            v = os.environ.get(k, "")
        out[k] = v
    return out


def _create_kw(args):
    return dict(name=args.name, env=_kv(args.env), hostname=args.hostname, ports=args.publish or [],
                memory=args.memory, cpus=args.cpus, pids_limit=args.pids_limit, volumes=args.volume or [],
                read_only=args.read_only, workdir=args.workdir, user=args.user,
                network=None if args.network == "none" else args.network,
                cap_add=args.cap_add or [], cap_drop=args.cap_drop or [], privileged=args.privileged,
                add_hosts=args.add_host or [])


def cmd_create(args):
    c = _lab(args).create(args.image, args.cmd or None, **_create_kw(args))
    print(c.id)
    return 0


def cmd_run(args):
    if args.detach_keys and not (args.tty and args.interactive and not args.detach):
        raise LabkitError("--detach-keys works with -i and -t together, without -d (a terminal and its keys)",
                          fix="add -it, or leave --detach-keys out (labkit attach takes its own)", exit_code=125)
    lab = _lab(args)
    if (args.interactive or args.tty) and not args.detach:
        return _run_interactive(lab, args)
    # (-d with -t and -i: a terminal and a stdin of its own, held by the supervisor for a later attach, as Docker's)
    c = lab.create(args.image, args.cmd or None, tty=args.tty, interactive=args.interactive, **_create_kw(args))
    try:
        c.start()
    except LabkitError:
        c.rm(force=True)
        raise
    if args.detach:
        print(c.id)
        return 0
    code = _follow(lab, c.id)
    if args.rm:
        c.rm(force=True)
    return code if code is not None else 0


def _terminal_here(lab, what, tty):
    """-i/-t hand this process's stdin/stdout to a process in a container: only where the agent's code can run in
    this very process (root on the target itself; labkit's daemon may be up, it is not needed for this)."""
    if lab.transport.name != "in-process" and not (lab.target == "local" and os.geteuid() == 0):
        raise LabkitError(f"{what} needs the agent on this machine, in this process (root on the target)",
                          fix=f"on the lab VM: `vagrant ssh -c 'cd /labkit && sudo python3 -m labkit.cli {what} "
                              "...'`; here: `sudo labkit ...`; or, with labkit's daemon up, the docker CLI: "
                              "DOCKER_HOST=unix:///run/labkit/docker.sock docker ...")
    if tty and not sys.stdin.isatty():
        # Docker's rule and words: -t gives the process this terminal, so there must be one
        raise LabkitError("the input device is not a TTY", fix="drop -t (keep -i to feed it stdin), or run "
                                                               "the command from a terminal", exit_code=1)


def _detach_keys(args):
    from .wire.words import detach_keys
    try:
        return detach_keys(args.detach_keys) if args.detach_keys else None
    except ValueError as exc:
        raise LabkitError(str(exc), fix="e.g. --detach-keys ctrl-x,x", exit_code=125) from None


def _run_interactive(lab, args):
    """-it: the container gets this terminal (-i alone: this stdin); its exit code is ours. Detached with the
    detach keys (-it: Ctrl-P Ctrl-Q), it goes on (and with --rm is removed when it ends), and we exit 0."""
    keys = _detach_keys(args)
    _terminal_here(lab, "run -it", args.tty)
    from .agent import local
    c = lab.create(args.image, args.cmd or None, tty=args.tty, interactive=args.interactive, **_create_kw(args))
    from .wire.words import DETACHED
    code = "failed"
    try:
        code = local.run_attached(c.id, detach=keys)
    finally:
        if args.rm and code == DETACHED:
            local.auto_remove(c.id)
        elif args.rm:
            c.rm(force=True)
    return code if isinstance(code, int) else 0


def cmd_attach(args):
    """`docker attach`: this terminal to a running -t container's; detach with Ctrl-P Ctrl-Q (or --detach-keys)."""
    lab = _lab(args)
    keys = _detach_keys(args)
    _terminal_here(lab, "attach", False)
    from .agent import local
    code = local.attach_here(args.container, detach=keys)
    return code if isinstance(code, int) else 0


def _follow(lab, ref, follow=True):
    """Print the container's log (to its end, with ``follow``: until it has stopped); its exit code. While
    nothing new comes, wait on the container itself (a quarter of a second at most), not a fixed sleep: a
    short-lived container's `labkit run` ends as soon as it has."""
    offset = 0
    while True:
        chunk = lab.call("container.logs", ref=ref, offset=offset)
        sys.stdout.write(chunk["text"])
        sys.stdout.flush()
        offset = chunk["offset"]
        if not follow or (not chunk["running"] and not chunk["text"]):
            break
        if not chunk["text"]:
            lab.call("container.wait", ref=ref, timeout=0.25)
    return lab.call("container.wait", ref=ref, timeout=1)["exit_code"] if follow else 0


def _each(args, method, **params):
    """start/stop/rm: one request per container named, each name printed as Docker does."""
    lab = _lab(args)
    for ref in args.containers:
        lab.call(method, ref=ref, **params)
        print(ref)
    return 0


def cmd_start(args):
    return _each(args, "container.start")


def cmd_stop(args):
    return _each(args, "container.stop", timeout=args.time)


def cmd_rm(args):
    return _each(args, "container.rm", force=args.force)


def _ago(t):
    from .wire.words import ago
    return ago(t) + " ago"


def cmd_ps(args):
    from .client.records import text_table
    from .wire.words import container_status
    rows = [{"CONTAINER ID": r["id"], "IMAGE": r["image"], "COMMAND": '"' + r["command"][:20] + '"',
             "CREATED": _ago(r["created"]), "STATUS": container_status(r), "PORTS": r["ports"], "NAMES": r["name"]}
            for r in _lab(args).call("container.ps", all=args.all)]
    print(text_table(rows, ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]))
    return 0


def cmd_logs(args):
    _follow(_lab(args), args.container, follow=args.follow)
    return 0


def cmd_top(args):
    from .client.records import text_table
    rows = [{"PID": p["pid"], "UID": p["uid"], "CMD": p["cmd"]} for p in _lab(args).call("container.top", ref=args.container)]
    print(text_table(rows, ["PID", "UID", "CMD"]))
    return 0


def render_format(template, data):
    """The part of Go templates that `docker inspect --format` users type: {{.A.B}} and {{json .A}}."""
    import re

    def value(path):
        v = data
        for part in [p for p in path.split(".") if p]:
            v = v.get(part) if isinstance(v, dict) else None
        return v

    def sub(m):
        expr = m.group(1).strip()
        if expr.startswith("json "):
            return json.dumps(value(expr[5:].strip()))
        v = value(expr)
        return "" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    return re.sub(r"\{\{\s*(.*?)\s*\}\}", sub, template)


def cmd_inspect(args):
    """Containers, and (as docker inspect does) images by name when no container has that name."""
    lab = _lab(args)
    out = []
    for ref in args.containers:
        if args.type != "image":
            try:
                out.append(lab.call("container.inspect", ref=ref))
                continue
            except NotFound:
                if args.type == "container":
                    raise
        try:
            out.append(lab.call("image.inspect", ref=ref))
        except LabkitError as exc:
            if args.type == "image":
                raise
            raise NotFound(f"no such object: {ref}", fix="see `labkit ps -a` and `labkit images`") from exc
    if args.format:
        for o in out:
            print(render_format(args.format, o))
    else:
        print(json.dumps(out, indent=4))
    return 0


def cmd_exec(args):
    if not args.cmd:
        raise LabkitError("exec needs a command to run in the container", fix="e.g. labkit exec -it web sh",
                          exit_code=125)
    lab = _lab(args)
    if args.interactive or args.tty:
        _terminal_here(lab, "exec -it", args.tty)
        from .agent import local
        return local.exec_attached(args.container, args.cmd, stdin=args.interactive, tty=args.tty)
    res = lab.call("container.exec", ref=args.container, argv=args.cmd)
    sys.stdout.write(res["stdout"])
    sys.stderr.write(res["stderr"])
    return res["exit_code"]


def cmd_images(args):
    from .client.records import text_table
    rows = []
    for i in _lab(args).call("image.list"):
        repo, _, tag = i["ref"].rpartition(":")
        rows.append({"REPOSITORY": repo, "TAG": tag, "IMAGE ID": i["id"].split(":")[1][:12],
                     "CREATED": _ago(i["created"]), "SIZE": f"{i['size'] / 1e6:.1f}MB"})
    print(text_table(rows, ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]))
    return 0


def cmd_rmi(args):
    lab = _lab(args)
    for ref in args.images:
        lab.call("image.rmi", ref=ref, force=args.force)
        print(f"Untagged: {ref}")
    return 0


def cmd_build(args):
    recipe_path = args.file or os.path.join(args.context, "Dockerfile")
    if not os.path.exists(recipe_path) and not args.file:
        recipe_path = os.path.join(args.context, "Labkitfile")
    with open(recipe_path) as f:
        recipe = f.read()
    context = {}
    for dirpath, _, files in os.walk(args.context):
        for fn in files:
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, args.context)
            if full != recipe_path and os.path.getsize(full) < (8 << 20):
                try:
                    context[rel] = open(full, encoding="utf-8").read()
                except UnicodeDecodeError:
                    continue
    rec = _lab(args).build(recipe, args.tag, context=context, no_cache=args.no_cache)
    for st in rec["steps"]:
        print(f"Step {st['step']}/{len(rec['steps'])} : {st['line']}" + ("  (cached)" if st["cached"] else
                                                                         f"  ({st['seconds']:.2f} s)"))
    print(f"Successfully built {rec['image']['id'].split(':')[1][:12]}\nSuccessfully tagged {rec['image']['ref']}")
    return 0


def cmd_commit(args):
    rec = _lab(args).call("image.commit", cid=args.container, ref=args.ref, message=args.message or "commit")
    print(rec["image"]["id"])
    return 0


def cmd_pull(args):
    rec = _lab(args).pull(args.image)
    facts = rec.get("facts") or {}
    for layer in [] if facts.get("up_to_date") else facts.get("layers_present") or []:  # one line per layer
        print(f"{layer.split(':')[-1][:12]}: Already exists")
    for layer in facts.get("layers_fetched") or []:
        print(f"{layer.split(':')[-1][:12]}: Pull complete")
    # Docker's Digest is the manifest's (what the registry names the image by); the image id is the config's
    from .wire.words import pull_status
    print(f"Digest: {facts.get('digest')}\nStatus: {pull_status(facts)} for {args.image}")
    return 0


def cmd_push(args):
    rec = _lab(args).push(args.image)
    print(f"{args.image}: pushed {len(rec['facts']['pushed_blobs'])} new blobs; manifest {rec['facts']['manifest']}")
    return 0


def cmd_tag(args):
    _lab(args).tag(args.source, args.new_name)
    return 0


def cmd_kill(args):
    return _each(args, "container.kill", sig=_signal(args.signal))


def _signal(name):
    from .wire.words import signal_number
    try:
        return signal_number(name)
    except ValueError:
        raise LabkitError(f"{name!r} is not a signal", fix="e.g. -s TERM, -s SIGHUP or -s 9",
                          exit_code=125) from None


def cmd_search(args):
    from .client.records import text_table
    rows = [{"NAME": r["name"], "DESCRIPTION": r["description"][:45], "STARS": r["stars"],
             "OFFICIAL": "[OK]" if r["official"] else ""}
            for r in _lab(args).search(args.term, registry=args.registry)][:args.limit]
    print(text_table(rows, ["NAME", "DESCRIPTION", "STARS", "OFFICIAL"]))
    return 0


def cmd_version(args):
    import platform
    print(f"Client:\n Version:      {__version__}\n Python:       {platform.python_version()}\n"
          f" OS/Arch:      {sys.platform}/{platform.machine()}")
    lab = _lab(args)
    hello = lab.transport.hello or {}
    print(f"\nServer: labkit's agent, {lab.transport.name}\n Version:      {hello.get('version', '?')}\n"
          f" Kernel:       {hello.get('kernel', '?')}")
    if lab.transport.name == "daemon":
        print(" Engine API:   1.41 (the docker CLI: DOCKER_HOST=unix:///run/labkit/docker.sock)")
    return 0


def cmd_network(args):
    from .client.records import text_table
    lab = _lab(args)
    if args.action in ("ls", "list"):
        rows = [{"NETWORK ID": n["spec"]["name"], "NAME": n["spec"]["name"], "DRIVER": "bridge",
                 "SUBNET": n["spec"]["subnet"]} for n in lab.networks()]
        print(text_table(rows, ["NETWORK ID", "NAME", "DRIVER", "SUBNET"]))
        return 0
    if not args.names:
        raise LabkitError(f"network {args.action} needs a network name", fix=f"e.g. labkit network {args.action} "
                                                                               "web")
    for name in args.names:
        if args.action == "create":
            lab.network(name, **({"subnet": args.subnet} if args.subnet else {}))
            print(name)
        elif args.action in ("rm", "remove"):
            lab.call("net.remove", name=name)
            print(name)
        else:
            print(json.dumps(lab.call("net.inspect", name=name), indent=4))
    return 0


def cmd_volume(args):
    """`docker volume ls|create|inspect|rm`."""
    from .client.records import text_table
    lab = _lab(args)
    if args.action in ("ls", "list"):
        rows = [{"DRIVER": v["driver"], "VOLUME NAME": v["name"]} for v in lab.volumes()]
        print(text_table(rows, ["DRIVER", "VOLUME NAME"]))
        return 0
    if not args.names:
        raise LabkitError(f"volume {args.action} needs a volume name", fix=f"e.g. labkit volume {args.action} notes")
    for name in args.names:
        if args.action == "create":
            lab.volume(name)
            print(name)
        elif args.action in ("rm", "remove"):
            lab.volume_rm(name, force=args.force)
            print(name)
        else:
            print(json.dumps(lab.call("volume.inspect", name=name), indent=4))
    return 0


# --- lab 09: clusters, and Docker Swarm's verbs on them (node, service, stack) ---------------------------------

def _cluster(args):
    """The Lab, and the cluster for node/service/stack: --cluster, else $LABKIT_CLUSTER, else the only one there is."""
    lab = _lab(args)
    name = args.cluster or os.environ.get("LABKIT_CLUSTER")
    if name:
        return lab, name
    names = [c["name"] for c in lab.call("cluster.list")]
    if not names:
        raise NotFound("there is no cluster", fix="make one: labkit cluster create demo")
    if len(names) > 1:
        raise InvalidSpec(f"there are {len(names)} clusters: {', '.join(names)}",
                          fix="say which: pass --cluster NAME (or set LABKIT_CLUSTER)")
    return lab, names[0]


def _print_nodes(nodes):
    """`docker node ls`'s table."""
    from .client.records import text_table
    rows = [{"ID": n["id"], "HOSTNAME": n["name"], "STATUS": n["status"].capitalize(),
             "AVAILABILITY": n.get("availability", "active").capitalize(),
             "MANAGER STATUS": "Leader" if n["role"] == "manager" else ""} for n in nodes]
    print(text_table(rows, ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"]))


def cmd_cluster_create(args):
    """The cluster's nodes, then its manager (the control loop, a process of its own)."""
    from .wire.specs import ClusterSpec
    nets = {k: v for k, v in (("subnet", args.subnet), ("tasks", args.tasks)) if v}
    if args.machine and args.workers is not None and args.workers != len(args.machine):
        raise InvalidSpec(f"--workers {args.workers} with {len(args.machine)} --machine: a worker runs on each machine",
                          fix="leave --workers out when you name the machines")
    spec = ClusterSpec(args.name, len(args.machine) if args.machine else 2 if args.workers is None else args.workers,
                       machines=tuple(args.machine or ()), **nets)
    lab = _lab(args)
    rec = lab.call("cluster.create", spec=spec.to_dict())
    lab.call("cluster.manage", name=spec.name)
    _print_nodes(rec["cluster"]["nodes"])
    return 0


def cmd_cluster_ls(args):
    from .client.records import text_table
    rows = []
    for c in _lab(args).call("cluster.list"):
        manager = c.get("manager")
        pid = manager.get("pid") if isinstance(manager, dict) else manager
        rows.append({"NAME": c["name"], "NODES": len(c["nodes"]), "MANAGER": pid or "-"})
    print(text_table(rows, ["NAME", "NODES", "MANAGER"]))
    return 0


def cmd_cluster_rm(args):
    lab = _lab(args)
    for name in args.names:
        lab.call("cluster.remove", name=name)
        print(name)
    return 0


def cmd_cluster_inspect(args):
    lab = _lab(args)
    print(json.dumps([lab.call("cluster.inspect", name=name) for name in args.names], indent=4))
    return 0


def cmd_node_ls(args):
    lab, cluster = _cluster(args)
    _print_nodes(lab.call("cluster.inspect", name=cluster)["nodes"])
    return 0


def cmd_node_update(args):
    lab, cluster = _cluster(args)
    lab.call("cluster.node_update", name=cluster, node=args.node, availability=args.availability)
    print(args.node)
    return 0


def cmd_node_inspect(args):
    """Nodes by name or id, as `docker node inspect`."""
    lab, cluster = _cluster(args)
    nodes = lab.call("cluster.inspect", name=cluster)["nodes"]
    out = []
    for ref in args.nodes:
        found = [n for n in nodes if ref in (n["id"], n["name"])]
        if not found:
            raise NotFound(f"no such node in cluster {cluster}: {ref}", fix="see labkit node ls")
        out.append(found[0])
    print(json.dumps(out, indent=4))
    return 0


def _health(args):
    """--health-*: the HealthCheck that runs --health-cmd as Docker does (sh -c CMD), or None."""
    from .wire.orchestration import HealthCheck, duration
    given = {k: v for k, v in (("interval", args.health_interval), ("retries", args.health_retries),
                               ("start_period", args.health_start_period), ("timeout", args.health_timeout))
             if v is not None}
    if not args.health_cmd:
        if given:
            raise InvalidSpec("--health-interval, --health-retries, --health-start-period and --health-timeout go "
                              "with --health-cmd", fix="add the check, e.g. --health-cmd 'wget -q -O- http://localhost/'")
        return None
    for k in ("interval", "start_period", "timeout"):
        if k in given:
            given[k] = duration(given[k], "--health-" + k.replace("_", "-"))
    return HealthCheck(("sh", "-c", args.health_cmd), **given)


def cmd_service_create(args):
    import secrets
    from .wire.orchestration import ServiceSpec, duration
    fields = {k: v for k, v in (("replicas", args.replicas), ("update_parallelism", args.update_parallelism),
                                ("update_failure_action", args.update_failure_action)) if v is not None}
    if args.update_delay is not None:
        fields["update_delay"] = duration(args.update_delay, "--update-delay")
    spec = ServiceSpec(name=args.name or "svc-" + secrets.token_hex(3), image=args.image, cmd=args.cmd or None,
                       env=_kv(args.env), ports=args.publish or [], health=_health(args), **fields)
    lab, cluster = _cluster(args)
    lab.call("service.create", name=cluster, spec=spec.to_dict())
    print(spec.name)
    return 0


def cmd_service_ls(args):
    from .client.records import text_table
    lab, cluster = _cluster(args)
    rows = [{"ID": s["name"], "NAME": s["name"], "MODE": "replicated",
             "REPLICAS": f"{s['running']}/{s['replicas']}" + (f" ({s['update']})" if s.get("update") else ""),
             "IMAGE": s["image"], "PORTS": ", ".join(s["ports"])} for s in lab.call("service.ls", name=cluster)]
    print(text_table(rows, ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]))
    return 0


def _print_tasks(tasks):
    """`docker service ps`'s table: per slot the newest task first, the older ones under it (\\_)."""
    from .client.records import text_table
    rows, seen = [], set()
    for t in sorted(tasks, key=lambda t: (t["service"], t["slot"], -t["since"], t["desired"] != "running")):
        slot = (t["service"], t["slot"])
        rows.append({"ID": t["id"], "NAME": (" \\_ " if slot in seen else "") + f"{t['service']}.{t['slot']}",
                     "IMAGE": t["image"], "NODE": t["node"] or "", "DESIRED STATE": t["desired"].capitalize(),
                     "CURRENT STATE": f"{t['state'].capitalize()} {_ago(t['since']).lower()}",
                     "ERROR": '"' + " ".join(t["error"].split()) + '"' if t["error"] else ""})
        seen.add(slot)
    print(text_table(rows, ["ID", "NAME", "IMAGE", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR"]))


def cmd_service_ps(args):
    lab, cluster = _cluster(args)
    _print_tasks([t for s in args.services for t in lab.call("service.ps", name=cluster, service=s)])
    return 0


def cmd_service_scale(args):
    """SERVICE=N...: every argument read before the first is scaled (a service that does not exist stops the rest)."""
    scales = []
    for arg in args.scales:
        service, _, n = arg.partition("=")
        if not service or not (n.isascii() and n.isdigit()):
            raise InvalidSpec(f"{arg!r} is not SERVICE=REPLICAS", fix="e.g. labkit service scale web=3 api=2")
        scales.append((service, int(n)))
    lab, cluster = _cluster(args)
    for service, n in scales:
        lab.call("service.update", name=cluster, service=service, replicas=n)
        print(f"{service} scaled to {n}")
    return 0


def cmd_service_update(args):
    if args.image is None and args.replicas is None:
        raise InvalidSpec(f"nothing to update in {args.service}", fix="give --image IMAGE (a rolling update) "
                                                                       "or --replicas N")
    lab, cluster = _cluster(args)
    lab.call("service.update", name=cluster, service=args.service, image=args.image, replicas=args.replicas)
    print(args.service)
    return 0


def cmd_service_rollback(args):
    lab, cluster = _cluster(args)
    lab.call("service.rollback", name=cluster, service=args.service)
    print(args.service)
    return 0


def cmd_service_rm(args):
    lab, cluster = _cluster(args)
    for service in args.services:
        lab.call("service.rm", name=cluster, service=service)
        print(service)
    return 0


def cmd_service_inspect(args):
    lab, cluster = _cluster(args)
    print(json.dumps([lab.call("service.inspect", name=cluster, service=s) for s in args.services], indent=4))
    return 0


COMPOSE_MAX = 1 << 20


def _compose(path):
    """A Compose file, parsed: at most COMPOSE_MAX bytes of YAML with a mapping at its top."""
    import yaml
    try:
        with open(path, "rb") as f:
            raw = f.read(COMPOSE_MAX + 1)
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror}", fix="give -c the path of a Compose file") from None
    if len(raw) > COMPOSE_MAX:
        raise InvalidSpec(f"{path} is over 1 MiB, too big for a Compose file",
                          fix="check the path: a stack's Compose file is a few KiB")
    try:
        data = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as exc:
        raise InvalidSpec(f"{path} is not YAML: {exc}", fix="correct the file where the message says") from None
    if not isinstance(data, dict):
        raise InvalidSpec(f"{path} is not a Compose file: its top level is "
                          f"{'empty' if data is None else 'a ' + type(data).__name__}, not a mapping",
                          fix="e.g. services: {web: {image: busybox}}")
    return data


def cmd_stack_deploy(args):
    from .wire.orchestration import StackSpec
    stack = StackSpec.from_compose(args.stack, _compose(args.compose_file))
    lab, cluster = _cluster(args)
    res = lab.call("stack.deploy", name=cluster, spec=stack.to_dict())
    for word, key in (("Creating", "created"), ("Updating", "updated")):
        for name in res[key]:
            print(f"{word} service {name}")
    return 0


def cmd_stack_ls(args):
    from .client.records import text_table
    lab, cluster = _cluster(args)
    rows = [{"NAME": s["name"], "SERVICES": s["services"]} for s in lab.call("stack.ls", name=cluster)]
    print(text_table(rows, ["NAME", "SERVICES"]))
    return 0


def cmd_stack_ps(args):
    lab, cluster = _cluster(args)
    _print_tasks(lab.call("stack.ps", name=cluster, stack=args.stack))
    return 0


def cmd_stack_rm(args):
    lab, cluster = _cluster(args)
    for stack in args.stacks:
        for name in lab.call("stack.rm", name=cluster, stack=stack)["removed"]:
            print(f"Removing service {name}")
    return 0


def cmd_bench(args):
    from .course import bench
    experiments = [e.strip() for e in args.only.split(",")] if args.only else None
    cases = [c.strip() for c in args.cases.split(",")]
    res = bench.Bench(_lab(args), "full" if args.full else "quick", experiments=experiments, cases=cases,
                      accel=args.accel, repeats=args.repeats, progress=not args.quiet).run()
    import pandas as pd
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(bench.env_line(res.env))
        print(res.summary().round(3).to_string(index=False))
    for note in res.env.get("notes", []):
        print("note:", note)
    for path in res.save(args.output):
        print("wrote", path)
    return 0


def cmd_assign(args):
    from .course.assign import grading_bundle, write_bundle, write_student_editions
    if args.hidden and not args.bundle:
        raise LabkitError("--hidden goes into the grading bundle", fix="add --bundle PATH")
    if args.bundle:
        grading_bundle(args.source, args.hidden)  # a source or hidden check the grader could not use: nothing written
    for p in write_student_editions(args.source, args.output, keep=args.keep):
        print(p)
    if args.bundle:
        bundle = write_bundle(args.source, args.bundle, args.hidden)
        points = sum(n["points"] for n in bundle["notebooks"].values())
        hidden = sum(n.get("hidden", {}).get("points", 0) for n in bundle["notebooks"].values())
        print(f"{args.bundle}: the grading bundle ({len(bundle['notebooks'])} notebooks, {points:g} points"
              + (f" and {hidden:g} in hidden checks" if hidden else "") + "); keep it for the grader, not for students")
    return 0


def grade_job(task):
    """One submission graded in a sandbox on the machine this runs on (what a Dask worker imports and runs)."""
    from . import connect
    from .course.grade import grade_submission
    return grade_submission(task, connect("local"))


def cmd_grade(args):
    from . import connect
    from .course.grade import grade_class, load_bundle, submissions, vm_questions
    bundle = load_bundle(args.bundle)
    if args.jobs < 1:
        raise LabkitError(f"--jobs {args.jobs} runs nothing", fix="give --jobs 1 or more")
    target = None
    if args.sandbox == "target":
        target = _lab(args)
        if args.jobs > 1:
            raise LabkitError("one disposable target cannot serve several submissions at once",
                              fix="grade with --jobs 1 on --sandbox target, or use --sandbox vm or container")
    host = connect("local")
    total = len(submissions(args.submissions))
    needs_vm = vm_questions(bundle) if args.sandbox == "vm" else []
    if needs_vm:
        print(f"note: {', '.join(needs_vm)} boot a VM on the agent, which the grading VM cannot: under --sandbox vm "
              "they score zero with that reason; grade those notebooks with --sandbox container (a class you "
              "trust) or --sandbox target", file=sys.stderr)
    bar = None
    if sys.stderr.isatty() and not os.environ.get("CI"):
        from tqdm import tqdm
        bar = tqdm(total=total, unit="submission", file=sys.stderr)
    say = bar.write if bar is not None else (lambda line: print(line, flush=True))

    def done(res):
        got = sum(q["points"] for q in res["questions"])
        out_of = sum(q["max_points"] for q in res["questions"])
        what = res.get("notebook") or os.path.basename(res.get("path", "?"))
        tail = (f"  ({res['error']})" if res.get("error") else "") + ("  (unchanged: not run again)" if res.get("cached") else "")
        say(f"{res['student']:<20} {what:<28} {got:5g}/{out_of:<4g}{tail}")
        if bar is not None:
            bar.update(1)
    try:
        book = grade_class(args.submissions, bundle, host, args.source, args.out, sandbox=args.sandbox, target=target,
                           hide=[args.bundle], force=args.force, cell_timeout=args.cell_timeout,
                           submission_timeout=args.submission_timeout, jobs=args.jobs, dask=args.dask,
                           dask_job=grade_job, on_done=done)
    finally:
        if bar is not None:
            bar.close()
    print(f"{len(book)} students; gradebook, statistics, chart and feedback in {os.path.abspath(args.out)}")
    return 0


def cmd_daemon(args):
    """labkit's daemon: its own protocol on /run/labkit/labkitd.sock, Docker's Engine API on docker.sock."""
    from .agent.local import daemon_control
    if args.action == "run":
        return daemon_control("run", docker_api=not args.no_docker_api)
    if args.action == "start":
        st = daemon_control("start", docker_api=not args.no_docker_api)
        print(f"labkit's daemon runs (pid {st['pid']}): labkit talks to it on {st['socket']}; the docker CLI can, "
              f"with DOCKER_HOST=unix://{st['docker_socket']}")
        return 0
    if args.action == "stop":
        pid = daemon_control("stop")
        print(f"stopped labkit's daemon (pid {pid}); its containers go on running" if pid else
              "labkit's daemon was not running")
        return 0
    st = daemon_control("status")
    if st is None:
        print("labkit's daemon is not running (start it: labkit daemon start)")
        return 3
    print(f"labkit's daemon runs (pid {st['pid']}) on {st['socket']} and {st['docker_socket']}"
          + ("" if daemon_control("answers") else "; it does not answer"))
    return 0


class _Unused:
    """A sub-command's parser that is not built: every call on it does nothing (see :class:`_OnlyVerb`)."""

    def __getattr__(self, name):
        return lambda *a, **kw: self


class _OnlyVerb:
    """argparse's sub-parsers, built only for the verb given (some 30 of them cost every `labkit` command about
    15 ms); all of them when none is given or it is none of theirs (then the usage lists them all)."""

    def __init__(self, sub, only):
        self.sub, self.only, self.built = sub, only, False

    def add_parser(self, name, **kw):
        if self.only is not None and name != self.only:
            return _Unused()
        self.built = True
        return self.sub.add_parser(name, **kw)


def _parser(only=None):
    p = argparse.ArgumentParser(prog="labkit", description="Build a Linux container one mechanism at a time.")
    p.add_argument("--version", action="version", version=f"labkit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=os.environ.get("LABKIT_TARGET", "auto"),
                        help="auto, local, sudo or ssh://user@host:port (default: auto)")
    sub = _OnlyVerb(p.add_subparsers(dest="cmd", required=True), only)
    d = sub.add_parser("doctor", parents=[common], help="what this target can do, each line with its fix")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_doctor)
    c = sub.add_parser("cleanup", parents=[common], help="remove every kernel object labkit made (and nothing else)")
    c.add_argument("--dry-run", action="store_true")
    c.set_defaults(fn=cmd_cleanup)
    dm = sub.add_parser("daemon", help="labkit's daemon, as dockerd: start, stop, status, or run in the foreground")
    dm.add_argument("action", choices=("start", "stop", "status", "run"))
    dm.add_argument("--no-docker-api", action="store_true", help="only labkit's own socket, not Docker's Engine API")
    dm.set_defaults(fn=cmd_daemon)
    lab = sub.add_parser("lab", parents=[common], help="execute the notebooks headless into one output folder")
    lab.add_argument("--output", default="lab-output")
    lab.add_argument("--full", action="store_true", help="full mode instead of quick mode")
    lab.add_argument("--student", action="store_true",
                     help="run the student editions (solutions removed) instead of the solution editions")
    lab.add_argument("--lang", default="en", choices=("en", "ko"),
                     help="the edition's language: en (the source) or ko (한국어판: notebooks/ko)")
    lab.add_argument("notebooks", nargs="*")
    lab.set_defaults(fn=cmd_lab)
    jl = sub.add_parser("jupyter", parents=[common], help="open the course in JupyterLab (for a lecture, or to "
                                                           "work through the labs); prints the URL with its token")
    jl.add_argument("--dir", help="the notebooks to open (default: the course's, with the solutions; with "
                                  "--student: ./labkit-course, made if missing)")
    jl.add_argument("--student", action="store_true", help="open the student editions (made where missing, "
                                                            "a student's work kept)")
    jl.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    jl.add_argument("--port", type=int, default=8888)
    jl.add_argument("--big-screen", action="store_true", help="for a projector: large type on the page and in "
                                                               "every chart, thick high-contrast lines")
    jl.add_argument("--verbose", action="store_true", help="show JupyterLab's own log")
    jl.set_defaults(fn=cmd_jupyter)
    sc = sub.add_parser("scores", help="the points each executed notebook in a folder recorded")
    sc.add_argument("output", nargs="?", default="lab-output")
    sc.add_argument("--all", action="store_true", help="every course notebook must be there")
    sc.add_argument("--require-full", action="store_true",
                    help="exit 1 unless every notebook ran to the end with all its points (the solution editions)")
    sc.set_defaults(fn=cmd_scores)
    def container_flags(sp):
        sp.add_argument("--name")
        sp.add_argument("-e", "--env", action="append", help="KEY=VALUE")
        sp.add_argument("-p", "--publish", action="append", help="[HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp]")
        sp.add_argument("-v", "--volume", action="append", help="HOST_PATH:CONTAINER_PATH[:ro], or VOLUME_NAME:CONTAINER_PATH")
        sp.add_argument("-h", "--hostname")
        sp.add_argument("-m", "--memory", help="e.g. 64m")
        sp.add_argument("--cpus", type=float)
        sp.add_argument("--pids-limit", type=int)
        sp.add_argument("--read-only", action="store_true")
        sp.add_argument("-w", "--workdir")
        sp.add_argument("-u", "--user", help="uid[:gid]")
        sp.add_argument("--network", default="default", help="a labkit network, or none")
        sp.add_argument("--cap-add", action="append", help="a capability to add to Docker's default 14 (or ALL)")
        sp.add_argument("--cap-drop", action="append", help="a capability to drop (or ALL)")
        sp.add_argument("--privileged", action="store_true", help="keep every capability, /proc/sys writable")
        sp.add_argument("--add-host", action="append", help="NAME:IP, a line of its own /etc/hosts")
        sp.add_argument("--help", action="help", help="show this help (-h is --hostname, as in Docker)")
        sp.add_argument("image")
        sp.add_argument("cmd", nargs=argparse.REMAINDER)

    sp = sub.add_parser("create", parents=[common], help="create a container", add_help=False)
    container_flags(sp)
    sp.set_defaults(fn=cmd_create)
    sp = sub.add_parser("run", parents=[common], help="create and start a container", add_help=False)
    sp.add_argument("-d", "--detach", action="store_true")
    sp.add_argument("--rm", action="store_true")
    sp.add_argument("-i", "--interactive", action="store_true", help="the container reads this stdin")
    sp.add_argument("-t", "--tty", action="store_true", help="the container gets this terminal (with -i: a shell)")
    sp.add_argument("--detach-keys", help="with -it, the keys that leave the container running (ctrl-p,ctrl-q)")
    container_flags(sp)
    sp.set_defaults(fn=cmd_run)
    sp = sub.add_parser("attach", parents=[common], help="this terminal to a running container's (made with -t)")
    sp.add_argument("--detach-keys", help="the keys that leave the container running (default ctrl-p,ctrl-q)")
    sp.add_argument("container")
    sp.set_defaults(fn=cmd_attach)
    for verb, fn, helptext in (("start", cmd_start, "start containers"), ("stop", cmd_stop, "stop containers"),
                               ("rm", cmd_rm, "remove containers")):
        sp = sub.add_parser(verb, parents=[common], help=helptext)
        sp.add_argument("containers", nargs="+")
        if verb == "stop":
            sp.add_argument("-t", "--time", type=float, default=10)
        if verb == "rm":
            sp.add_argument("-f", "--force", action="store_true")
        sp.set_defaults(fn=fn)
    sp = sub.add_parser("ps", parents=[common], help="list containers")
    sp.add_argument("-a", "--all", action="store_true")
    sp.set_defaults(fn=cmd_ps)
    sp = sub.add_parser("logs", parents=[common], help="a container's output")
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("container")
    sp.set_defaults(fn=cmd_logs)
    sp = sub.add_parser("top", parents=[common], help="a container's processes")
    sp.add_argument("container")
    sp.set_defaults(fn=cmd_top)
    sp = sub.add_parser("inspect", parents=[common], help="a container's or an image's details (JSON)")
    sp.add_argument("-f", "--format")
    sp.add_argument("--type", choices=("container", "image"), help="only this kind of object")
    sp.add_argument("containers", nargs="+")
    sp.set_defaults(fn=cmd_inspect)
    sp = sub.add_parser("exec", parents=[common], help="run a command in a running container")
    sp.add_argument("-i", "--interactive", action="store_true", help="the command reads this stdin")
    sp.add_argument("-t", "--tty", action="store_true", help="the command gets this terminal")
    sp.add_argument("container")
    sp.add_argument("cmd", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_exec)
    sp = sub.add_parser("images", parents=[common], help="list images")
    sp.set_defaults(fn=cmd_images)
    sp = sub.add_parser("rmi", parents=[common], help="remove images")
    sp.add_argument("-f", "--force", action="store_true", help="even when a container was made from it (it keeps its layers)")
    sp.add_argument("images", nargs="+")
    sp.set_defaults(fn=cmd_rmi)
    sp = sub.add_parser("build", parents=[common], help="build an image from a recipe (FROM RUN COPY ENV WORKDIR CMD)")
    sp.add_argument("-t", "--tag", required=True)
    sp.add_argument("-f", "--file")
    sp.add_argument("--no-cache", action="store_true")
    sp.add_argument("context")
    sp.set_defaults(fn=cmd_build)
    sp = sub.add_parser("commit", parents=[common], help="a container's changes as a new image")
    sp.add_argument("-m", "--message")
    sp.add_argument("container")
    sp.add_argument("ref")
    sp.set_defaults(fn=cmd_commit)
    for verb, fn in (("pull", cmd_pull), ("push", cmd_push)):
        sp = sub.add_parser(verb, parents=[common], help=f"{verb} an image (OCI distribution API)")
        sp.add_argument("image")
        sp.set_defaults(fn=fn)
    sp = sub.add_parser("tag", parents=[common], help="another name for an image")
    sp.add_argument("source")
    sp.add_argument("new_name", metavar="target")
    sp.set_defaults(fn=cmd_tag)
    sp = sub.add_parser("kill", parents=[common], help="send a signal to containers (SIGKILL unless -s)")
    sp.add_argument("-s", "--signal", default="KILL")
    sp.add_argument("containers", nargs="+")
    sp.set_defaults(fn=cmd_kill)
    sp = sub.add_parser("search", parents=[common], help="images in a registry whose name holds TERM")
    sp.add_argument("--registry", default=os.environ.get("LABKIT_REGISTRY", "127.0.0.1:5000"),
                    help="host:port of a registry (default 127.0.0.1:5000, or $LABKIT_REGISTRY); docker.io: "
                         "Docker Hub's search (online only)")
    sp.add_argument("--limit", type=int, default=25)
    sp.add_argument("term")
    sp.set_defaults(fn=cmd_search)
    sp = sub.add_parser("version", parents=[common], help="labkit's version, and its agent's (the server)")
    sp.set_defaults(fn=cmd_version)
    sp = sub.add_parser("network", parents=[common], help="labkit networks: ls, create, rm, inspect")
    sp.add_argument("action", choices=("ls", "list", "create", "rm", "remove", "inspect"))
    sp.add_argument("--subnet", help="with create: a private IPv4 /16../29, e.g. 10.214.0.0/24")
    sp.add_argument("names", nargs="*")
    sp.set_defaults(fn=cmd_network)
    sp = sub.add_parser("volume", parents=[common], help="named volumes (data that outlives rm): ls, create, rm, "
                                                         "inspect")
    sp.add_argument("action", choices=("ls", "list", "create", "rm", "remove", "inspect"))
    sp.add_argument("-f", "--force", action="store_true", help="with rm: even while containers were made with it")
    sp.add_argument("names", nargs="*")
    sp.set_defaults(fn=cmd_volume)
    on_cluster = argparse.ArgumentParser(add_help=False)
    on_cluster.add_argument("--cluster", help="the cluster to talk to (default: $LABKIT_CLUSTER, else the only one)")

    def verbs(word, helptext):
        """``labkit WORD ACTION ...``: a function that adds an ACTION (its parser, with --target, and with
        --cluster for node, service and stack)."""
        group = sub.add_parser(word, help=helptext).add_subparsers(dest="action", required=True, metavar="COMMAND")
        parents = [common] + ([on_cluster] if word != "cluster" else [])

        def verb(action, fn, helptext, aliases=()):
            sp = group.add_parser(action, aliases=list(aliases), parents=parents, help=helptext)
            sp.set_defaults(fn=fn)
            return sp
        return verb

    verb = verbs("cluster", "lab 09's clusters of nodes on this host: create, ls, rm, inspect")
    sp = verb("create", cmd_cluster_create, "a manager and N workers, and its manager loop (the control loop)")
    sp.add_argument("--workers", type=int, help="workers on this host (default 2)")
    sp.add_argument("--machine", action="append", metavar="ADDRESS",
                    help="a worker on a machine of its own, by its private address (once per worker machine: "
                         "LABKIT_VM_NODES=3 vagrant up makes 192.168.56.11 and .12)")
    sp.add_argument("--subnet", help="the nodes' network, a private IPv4 subnet (default 10.209.0.0/24)")
    sp.add_argument("--tasks", help="the tasks' addresses, a /24 per node (default 10.214.0.0/16)")
    sp.add_argument("name")
    verb("ls", cmd_cluster_ls, "list clusters", aliases=["list"])
    verb("rm", cmd_cluster_rm, "remove clusters (their nodes, tasks and networks)", aliases=["remove"]) \
        .add_argument("names", nargs="+")
    verb("inspect", cmd_cluster_inspect, "a cluster's record (JSON)").add_argument("names", nargs="+")
    verb = verbs("node", "a cluster's nodes, as docker node: ls, update, inspect")
    verb("ls", cmd_node_ls, "list nodes", aliases=["list"])
    sp = verb("update", cmd_node_update, "set a node's availability")
    sp.add_argument("--availability", required=True, choices=("active", "pause", "drain"))
    sp.add_argument("node")
    verb("inspect", cmd_node_inspect, "nodes' records (JSON)").add_argument("nodes", nargs="+")
    verb = verbs("service", "a cluster's services, as docker service: create, ls, ps, scale, update, rollback, "
                            "rm, inspect")
    sp = verb("create", cmd_service_create, "create a service")
    sp.add_argument("--name", help="default: svc- and 6 random hex digits")
    sp.add_argument("--replicas", type=int, help="default 1")
    sp.add_argument("-p", "--publish", action="append", help="PUBLISHED:TARGET[/tcp|/udp], on every node")
    sp.add_argument("-e", "--env", action="append", help="KEY=VALUE")
    sp.add_argument("--health-cmd", help="a shell command (sh -c CMD) run in each task; exit 0 is healthy")
    sp.add_argument("--health-interval", help="e.g. 500ms, 2s, 1m30s")
    sp.add_argument("--health-retries", type=int)
    sp.add_argument("--health-start-period", help="e.g. 5s")
    sp.add_argument("--health-timeout", help="a check still running after this has failed (default 10s), e.g. 5s")
    sp.add_argument("--update-parallelism", type=int, help="slots replaced at a time (default 1)")
    sp.add_argument("--update-delay", help="between two batches, e.g. 10s (default 0s)")
    sp.add_argument("--update-failure-action", help="rollback (default; Docker's is pause), pause or continue")
    sp.add_argument("image")
    sp.add_argument("cmd", nargs=argparse.REMAINDER)
    verb("ls", cmd_service_ls, "list services", aliases=["list"])
    verb("ps", cmd_service_ps, "services' tasks").add_argument("services", nargs="+")
    verb("scale", cmd_service_scale, "set services' replicas").add_argument("scales", nargs="+",
                                                                            metavar="SERVICE=REPLICAS")
    sp = verb("update", cmd_service_update, "a new image (a rolling update) or number of replicas")
    sp.add_argument("--image")
    sp.add_argument("--replicas", type=int)
    sp.add_argument("service")
    verb("rollback", cmd_service_rollback, "back to the service's previous spec").add_argument("service")
    verb("rm", cmd_service_rm, "remove services", aliases=["remove"]).add_argument("services", nargs="+")
    verb("inspect", cmd_service_inspect, "services' records (JSON)").add_argument("services", nargs="+")
    verb = verbs("stack", "services from a Compose file, as docker stack: deploy, ls, ps, rm")
    sp = verb("deploy", cmd_stack_deploy, "create or update a stack's services from a Compose file (format 3)",
              aliases=["up"])
    sp.add_argument("-c", "--compose-file", required=True)
    sp.add_argument("stack")
    verb("ls", cmd_stack_ls, "list stacks", aliases=["list"])
    verb("ps", cmd_stack_ps, "a stack's tasks").add_argument("stack")
    verb("rm", cmd_stack_rm, "remove stacks", aliases=["remove", "down"]).add_argument("stacks", nargs="+")

    b = sub.add_parser("bench", parents=[common], help="measure native vs container vs VM (CSV + PNG charts)")
    b.add_argument("--full", action="store_true", help="more repeats and larger workloads (slower, more precise)")
    b.add_argument("--only", help="comma-separated experiments: " + ",".join(
        ("startup", "cpu", "memory", "syscalls", "fork", "fileio", "net-throughput", "net-latency", "density")))
    b.add_argument("--cases", default="native,container,vm", help="native plus any of container, vm")
    b.add_argument("--accel", choices=("kvm", "tcg"), help="force the VM's accelerator (default: probe)")
    b.add_argument("--repeats", type=int)
    b.add_argument("--output", default="bench-output")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=cmd_bench)
    a = sub.add_parser("assign", help="write student editions (solutions removed) and the grading bundle")
    a.add_argument("--source", default=NOTEBOOK_DIR, help="the instructor's notebooks (default: the course's)")
    a.add_argument("--output", default="student-notebooks", help="where the student editions go")
    a.add_argument("--bundle", help="also write the grading bundle here (check cells by id, points, source hash)")
    a.add_argument("--hidden", help="a folder of hidden checks (NN-title.py), kept outside the repository; "
                                    "they go into the bundle only")
    a.add_argument("--keep", action="store_true", help="leave notebooks already in --output as they are "
                                                          "(a student's work); write only the missing ones")
    a.set_defaults(fn=cmd_assign)
    g = sub.add_parser("grade", parents=[common], help="grade submitted notebooks against a grading bundle, each in "
                                                       "a sandbox of its own (run as root)")
    g.add_argument("submissions", nargs="+", help="a folder per student, or STUDENT-NN-title.ipynb files")
    g.add_argument("--bundle", required=True, help="the grading bundle from labkit assign --bundle")
    g.add_argument("--out", default="grades", help="where the gradebook, feedback and runs go")
    g.add_argument("--source", default=NOTEBOOK_DIR, help="the instructor's notebooks the bundle was made from")
    g.add_argument("--force", action="store_true", help="grade again what was graded before and did not change")
    g.add_argument("--sandbox", choices=["vm", "container", "target"], default="vm",
                   help="the agent each submission drives: 'vm' (default) a throw-away qemu guest restored from a "
                        "snapshot of a booted one (KVM when usable, TCG otherwise: root in it has only the guest's "
                        "kernel); 'container' a fresh agent in namespaces and a cgroup of its own on this machine "
                        "(faster; root in it shares this kernel: for a trusted class); 'target' the disposable "
                        "machine given by --target, one submission at a time")
    g.add_argument("--jobs", type=int, default=1, help="submissions graded at once on this machine (default 1)")
    g.add_argument("--dask", metavar="ADDRESS", help="send each submission to this Dask scheduler's workers instead "
                                                    "(each worker runs as root on a Linux machine with labkit)")
    g.add_argument("--cell-timeout", type=float, default=600, help="seconds one cell may run (default 600)")
    g.add_argument("--submission-timeout", type=float, default=1800,
                   help="seconds one submission may run in all (default 1800)")
    g.set_defaults(fn=cmd_grade)
    return p, sub.built


def main(argv=None):
    given = list(sys.argv[1:] if argv is None else argv)
    if given == ["--version"]:  # (what the whole parser would print, without building its 50 sub-parsers)
        print(f"labkit {__version__}")
        return 0
    argv = _management_form(given)
    if argv[:1] == [None]:
        print(f"labkit {given[0]}: say what to do: one of {', '.join(sorted(MANAGEMENT[given[0]]))}, e.g. "
              f"labkit {given[0]} ls", file=sys.stderr)
        return 125
    verb = argv[0] if argv else None
    p, built = _parser(verb if verb and not verb.startswith("-") else None)
    if not built:
        p, _ = _parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # a usage error: Docker's verbs exit 125 for it, as the docker CLI does
        if exc.code == 2 and verb in DOCKER_VERBS:
            return 125
        raise
    try:
        return args.fn(args)
    except LabkitError as exc:
        print(f"labkit: {exc}", file=sys.stderr)
        code = exc.details.get("exit_code") if isinstance(exc.details, dict) else None
        if isinstance(code, int) and 0 < code < 256:
            return code  # 126, 127: the container's program could not be run; 1: Docker's own word for it
        if verb in ("run", "create"):
            return 125  # docker run's code for an error of the engine itself
        return 1 if verb in DOCKER_VERBS else 2


# `docker container ls`, `docker image rm`: the management forms Docker's CLI has had since 1.13
MANAGEMENT = {
    "container": {"ls": ["ps"], "list": ["ps"], "ps": ["ps"], "rm": ["rm"], "remove": ["rm"],
                  "inspect": ["inspect", "--type", "container"],
                  **{v: [v] for v in ("create", "run", "start", "stop", "kill", "logs", "top", "exec", "commit",
                                      "attach")}},
    "image": {"ls": ["images"], "list": ["images"], "rm": ["rmi"], "remove": ["rmi"],
              "inspect": ["inspect", "--type", "image"], **{v: [v] for v in ("pull", "push", "tag", "build")}},
}
DOCKER_VERBS = {"run", "attach", "create", "start", "stop", "kill", "rm", "ps", "logs", "top", "inspect", "exec", "images",
                "rmi", "build", "commit", "pull", "push", "tag", "search", "version", "network", "volume", "node", "service",
                "stack"}


def _management_form(argv):
    """``container ls -a`` -> ``ps -a``; ``image rm x`` -> ``rmi x``; anything else unchanged. None when a
    management word comes without a verb it knows (the caller says which there are)."""
    if argv and argv[0] in MANAGEMENT:
        return MANAGEMENT[argv[0]].get(argv[1], [None]) + argv[2:] if len(argv) > 1 else [None]
    return argv


def _one_locale_search():
    """argparse asks gettext for a translation of every message it holds, and gettext searches the locale
    directories afresh for each (some 10 ms of `labkit --version` under a UTF-8 locale): this process's locale does
    not change while it runs, so each domain is searched once. Only for the command's own process."""
    import functools
    import gettext
    if getattr(gettext.find, "labkit_once", False):
        return
    gettext_find = gettext.find
    search = functools.lru_cache(maxsize=None)(lambda domain, localedir, all: gettext_find(domain, localedir, None, all))

    def find(domain, localedir=None, languages=None, all=False):
        if languages is not None:
            return gettext_find(domain, localedir, languages, all)
        found = search(domain, localedir, all)
        return list(found) if all else found  # (a list of paths, or one path or None)
    find.labkit_once = True
    gettext.find = find


def command():
    """The ``labkit`` command itself (the console script, ``python -m labkit``, ``python -m labkit.cli``): main's
    exit code. When nothing was registered to run at exit and no other thread runs (a plain `labkit run`, `ps`,
    `inspect`: not `lab`, which starts Jupyter kernels), the process ends as soon as its output is flushed,
    without Python tearing down every module one by one: some 8 ms of a command that takes 90."""
    import atexit
    import threading
    _one_locale_search()
    code = main()
    code = code if isinstance(code, int) else 0
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: let Python's own exit report it as it does
        return code
    ncallbacks = getattr(atexit, "_ncallbacks", None)
    if ncallbacks is not None and ncallbacks() == 0 and threading.active_count() == 1:
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(command())
