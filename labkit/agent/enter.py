"""Entering a running container, as `docker exec` does: its cgroup, its namespaces, its root, its capabilities.

``python3 -m labkit.agent.enter SPEC`` (SPEC: JSON ``{pid, namespaces, procs, cwd, env, argv, cap_keep}``)
joins the container's cgroup first (so all it starts is counted there), opens the namespace files and the
root of the container's PID 1 before joining any, joins them (the mount namespace last), moves into that
root, and forks (a PID namespace applies to children only). The child drops every capability the
container does not hold from its bounding set -- nsenter cannot, which is why this exists -- and execs.
The exit status is the program's (128 + signal when killed). Standard library only.
"""
import json
import os
import signal
import sys

from . import kernel
from .runner import close_sealed_python

ORDER = ("cgroup", "ipc", "uts", "net", "pid", "mnt")
PR_SET_PDEATHSIG = 1


def run_entered(spec, rec, timeout):
    """The agent's side: run this module with ``spec`` from the sealed interpreter (so that nothing inside the
    container can reach the host's binary through /proc/self/exe); returns the runner's Result."""
    from .runner import env_for_children, helper_argv, run
    argv, fds = helper_argv("enter", json.dumps(spec))
    return run(argv, pass_fds=fds, recorder=rec, check=False, timeout=timeout, env=env_for_children())


def main(argv=None):
    close_sealed_python()
    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    pid = int(spec["pid"])
    for procs in spec.get("procs", []):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    fds = {n: os.open(f"/proc/{pid}/ns/{n}", os.O_RDONLY) for n in ORDER if n in spec["namespaces"]}
    root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    for n in ORDER:
        if n in fds:
            kernel.setns(fds[n], kernel.NS_FLAGS[n])
            os.close(fds[n])
    os.fchdir(root)
    os.chroot(".")
    os.close(root)
    try:
        os.chdir(spec.get("cwd") or "/")
    except OSError:
        os.chdir("/")
    child = os.fork()
    if child == 0:
        try:
            kernel.libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if spec.get("cap_keep") is not None:
                kernel.drop_capabilities(spec["cap_keep"])
            args = [str(a) for a in spec["argv"]]
            os.execvpe(args[0], args, dict(spec.get("env") or {}))
        except OSError as exc:
            sys.stderr.write(f"labkit exec: {spec['argv'][0]}: {exc.strerror}\n")
            sys.stderr.flush()
        os._exit(127)
    return kernel.wait_exit_code(child)


if __name__ == "__main__":
    sys.exit(main())
