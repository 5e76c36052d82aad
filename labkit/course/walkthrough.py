"""The lecture's nginx walkthrough, typed as the lecture types it: the ``labkit`` command for each ``docker`` one.

:func:`nginx_walkthrough` runs the real ``labkit`` command line (``python -m labkit.cli ... --target T``: a
client process talking to the target's agent, as the docker CLI talks to dockerd) step by step: the version,
images, a search and a pull from the course's registry, create with a published port, ``ps -a`` (Created),
start, ``ps -a`` (Up), the page, logs, top, inspect, ``inspect --format``, ``exec -it`` editing the page (in a
real pseudo-terminal, where the target is this machine), the page again, stop, ``rmi`` refused because the
stopped container still uses the image, rm, rmi. Each step says whether it did what the lecture says it does.
The image is the course's web server (nginx where the target has an nginx image, busybox httpd otherwise:
the result says which), pushed to the registry first so that ``pull`` really fetches it.
"""
import os
import re
import subprocess
import sys
import time

from ..wire.errors import LabkitError

PAGE = ("import sys, urllib.request\n"
        "try:\n"
        "    sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
        "except OSError as exc:\n"
        "    sys.exit(f'no answer: {exc}')\n")


class Step(dict):
    """One step: {'lecture' (the docker command), 'typed' (the labkit one), 'exit_code', 'output', 'expect'
    (what the lecture says happens), 'ok'}."""

    def __str__(self):
        mark = "✓" if self["ok"] else "✗"
        out = self["output"].rstrip()
        return f"$ {self['typed']}        # {self['lecture']}\n{out + chr(10) if out else ''}{mark} {self['expect']}"


#: where the labkit package lies: the command's working directory (``python -m`` puts it first on sys.path, so
#: never a directory another user could write a module into)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(target, args, timeout=120):
    """``labkit ARGS`` as its own process, on ``target`` (by $LABKIT_TARGET: typed as the lecture types it)."""
    env = dict(os.environ, LABKIT_TARGET=target)
    res = subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=PACKAGE_ROOT)
    return res.returncode, res.stdout + res.stderr


def _exec_it(target, name, keys, timeout=30):
    """``labkit exec -it NAME sh`` in a pseudo-terminal of its own, ``keys`` typed into it: (exit code, what the
    terminal showed)."""
    import pty
    import select
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "exec", "-it", name, "sh"], stdin=slave,
                                stdout=slave, stderr=slave, start_new_session=True, cwd=PACKAGE_ROOT,
                                env=dict(os.environ, LABKIT_TARGET=target))
    finally:
        os.close(slave)
    seen, end = b"", time.monotonic() + timeout
    try:
        time.sleep(0.5)
        os.write(master, keys.encode())
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the terminal's other side closed: the command ended
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    finally:
        os.close(master)
    # (the terminal's control sequences, e.g. the shell asking where the cursor is, are not for reading)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode("utf-8", "replace").replace("\r\n", "\n"))


def nginx_walkthrough(lab, registry_url, image="course/web:v1", name="lk-walk", port=8088):
    """Run the walkthrough on ``lab``'s target with ``image`` (built already) and the registry at
    ``registry_url`` (host:port); returns {'server' ('nginx' or 'busybox httpd'), 'steps' [Step], 'ok'}. It
    leaves nothing behind: its container and both image names go at the end, also when a step fails."""
    target = lab.target if lab.target not in (None, "in-process") else "local"
    config = (lab.image(image).get("config") or {})
    server = "busybox httpd" if "httpd" in " ".join(config.get("Cmd") or []) else "nginx"
    web_root = "/var/www" if server == "busybox httpd" else "/usr/share/nginx/html"
    remote = f"{registry_url}/course/web:v1"
    steps = []

    def step(lecture, args, expect, check, typed=None):
        code, out = _cli(target, args)
        ok = bool(check(code, out))
        steps.append(Step(lecture=lecture, typed=typed or "labkit " + " ".join(_quote(a) for a in args),
                          exit_code=code, output=out, expect=expect, ok=ok))
        return code, out

    def page(lecture, expect, check):
        res = lab.run(["python3", "-c", PAGE, f"http://127.0.0.1:{port}/"], timeout=30)
        steps.append(Step(lecture=lecture, typed=f"curl http://127.0.0.1:{port}/", exit_code=res.exit_code,
                          output=res.stdout + res.stderr, expect=expect, ok=bool(check(res.exit_code, res.stdout))))

    try:  # a run stopped before its end (a killed kernel) left its container: the name is the walkthrough's own
        lab.container(name).rm(force=True)
    except LabkitError:
        pass
    lab.tag(image, remote)  # (preparation, not the lecture's: the registry must hold the image to pull it)
    pushed = lab.push(remote).facts["manifest"]
    lab.rmi(remote)
    try:
        step("docker --version", ["--version"], "prints the client's version", lambda c, o: c == 0 and "labkit" in o)
        step("docker images", ["images"], f"lists the images here; {remote} is not among them",
             lambda c, o: c == 0 and "REPOSITORY" in o and remote not in o)
        step("docker search nginx", ["search", "course", "--registry", registry_url],
             f"finds course/web in the registry at {registry_url}", lambda c, o: c == 0 and "course/web" in o)
        step("docker pull nginx", ["pull", remote], "fetches the image from the registry (the one pushed: same digest)",
             lambda c, o: c == 0 and pushed in o)
        if not steps[-1]["ok"]:  # what came back is not what was pushed (the registry is shared): go no further
            raise LabkitError(f"{remote} came back with another digest than the pushed {pushed}",
                              fix="someone else pushed to that registry meanwhile: run the walkthrough again")
        step("docker image ls", ["image", "ls"], f"now lists {remote}", lambda c, o: c == 0 and remote.rsplit(":", 1)[0] in o)
        step("docker ps", ["ps"], f"no container {name} yet", lambda c, o: c == 0 and name not in o)
        step(f"docker create -p {port}:80 --name {name} nginx", ["create", "-p", f"{port}:80", "--name", name, remote],
             "prints the new container's id", lambda c, o: c == 0 and re.fullmatch(r"[0-9a-f]{12,64}\s*", o))
        step("docker ps -a", ["ps", "-a"], f"{name} is there, Created", lambda c, o: c == 0 and _status(o, name) == "Created")
        step(f"docker start {name}", ["start", name], "prints its name", lambda c, o: c == 0 and name in o)
        step("docker ps -a", ["ps", "-a"], f"{name} is Up", lambda c, o: c == 0 and _status(o, name).startswith("Up"))
        page("the page in a browser", "the server answers with the course's page", lambda c, o: c == 0 and "<h1>" in o)
        step(f"docker logs {name}", ["logs", name], "what the server wrote (its log)", lambda c, o: c == 0)
        step(f"docker top {name}", ["top", name], "the container's processes, as the host sees them",
             lambda c, o: c == 0 and ("httpd" in o or "nginx" in o))
        step(f"docker inspect {name}", ["inspect", name], "everything about it, as JSON",
             lambda c, o: c == 0 and '"NetworkSettings"' in o)
        step(f"docker inspect --format '{{{{.NetworkSettings.IPAddress}}}}' {name}",
             ["inspect", "--format", "{{.NetworkSettings.IPAddress}}", name], "only its IP address",
             lambda c, o: c == 0 and re.fullmatch(r"\d+\.\d+\.\d+\.\d+\s*", o))
        edit = f"echo '<h1>edited with exec -it</h1>' > {web_root}/index.html; exit\n"
        if target == "local" and os.geteuid() == 0:
            code, out = _exec_it(target, name, edit)
            steps.append(Step(lecture=f"docker exec -it {name} /bin/sh", typed=f"labkit exec -it {name} sh",
                              exit_code=code, output=out, expect="a shell inside; the page edited, then exit",
                              ok=code == 0))
        else:  # a terminal of this process cannot reach another machine's container: the same edit, without one
            step(f"docker exec -it {name} /bin/sh", ["exec", name, "sh", "-c", edit.strip().removesuffix("; exit")],
                 "the page edited inside (no terminal: the target is not this machine)", lambda c, o: c == 0)
        page("the page again", "now the edited page", lambda c, o: c == 0 and "edited with exec -it" in o)
        step(f"docker stop {name}", ["stop", name], "prints its name", lambda c, o: c == 0 and name in o)
        step("docker ps", ["ps"], f"{name} is not running any more", lambda c, o: c == 0 and name not in o)
        step(f"docker rmi {remote}", ["rmi", remote], "refused: the stopped container still uses the image",
             lambda c, o: c != 0 and "(exited)" in o)
        step("docker container ls --all", ["container", "ls", "--all"], f"{name} is still there, Exited",
             lambda c, o: c == 0 and _status(o, name).startswith("Exited"))
        step(f"docker rm {name}", ["rm", name], "prints its name", lambda c, o: c == 0 and name in o)
        step("docker ps -a", ["ps", "-a"], f"{name} is gone", lambda c, o: c == 0 and name not in o)
        step(f"docker rmi {remote}", ["rmi", remote], "now the image goes", lambda c, o: c == 0 and "Untagged" in o)
    finally:
        for undo in (lambda: lab.container(name).rm(force=True), lambda: lab.rmi(remote, force=True)):
            try:
                undo()
            except LabkitError:
                pass
    return {"server": server, "steps": steps, "ok": all(s["ok"] for s in steps)}


def _status(ps_output, name):
    """The STATUS column of ``name``'s row in `ps` output ('' when it is not listed)."""
    lines = ps_output.splitlines()
    if not lines or "STATUS" not in lines[0]:
        return ""
    start = lines[0].index("STATUS")
    end = lines[0].index("PORTS") if "PORTS" in lines[0] else None
    for ln in lines[1:]:
        if ln.rstrip().endswith(name):
            return ln[start:end].strip()
    return ""


def _quote(arg):
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"
