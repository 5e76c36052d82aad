"""Entering a running container, as `docker exec` does: its cgroup, its namespaces, its root, its capabilities.

``python3 -m labkit.agent.enter SPEC`` (SPEC: JSON ``{pid, namespaces, procs, cwd, env, argv, cap_keep, tty}``)
joins the container's cgroup first (so all it starts is counted there), opens the namespace files and the
root of the container's PID 1 before joining any, joins them (the mount namespace last), moves into that
root, and forks (a PID namespace applies to children only). The child drops every capability the
container does not hold from its bounding set -- nsenter cannot, which is why this exists -- and execs
(with ``tty``, in a session of its own whose controlling terminal is its stdin). The exit status is the
program's (128 + signal when killed; 126 or 127 as Docker's when it could not be run). Standard library only.
"""
import contextlib
import errno
import json
import os
import signal
import sys

from ..wire.errors import MechanismError
from ..wire.words import Detach
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


def run_attached(spec, stdin=True):
    """The agent's side of `exec -it`: this module with ``spec``, its stdio this process's own (a terminal); its
    exit code."""
    import subprocess
    from .runner import env_for_children, helper_argv
    argv, fds = helper_argv("enter", json.dumps(spec))
    proc = subprocess.Popen(argv, pass_fds=fds, env=env_for_children(), stdin=None if stdin else subprocess.DEVNULL)
    with terminal_signals_to_child():
        return proc.wait()


def start_entered(spec, tty=False, stdin=False, output=True):
    """The agent's side of the Engine API's exec: this module with ``spec``, started, not waited for; returns
    (Popen, terminal master fd or None). With ``tty`` the program's stdio is a new pseudo-terminal (its
    controlling terminal, in a session of its own); else pipes: stdin when asked, stdout and stderr unless
    ``output`` is False (a detached exec)."""
    import subprocess
    import socket
    from .runner import env_for_children, helper_argv
    argv, fds = helper_argv("enter", json.dumps(dict(spec, tty=bool(tty))))
    if tty:  # the terminal is made inside, from the container's /dev/ptmx; its master comes back on this socket
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(argv, pass_fds=fds, env=env_for_children(), stdin=theirs,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            theirs.close()
        with ours:
            master = kernel.receive_console(ours)
        if master is None:
            proc.wait()
            raise MechanismError("the command got no terminal in the container (no /dev/ptmx there?)",
                                 fix="exec without -t")
        return proc, master
    out = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen(argv, pass_fds=fds, env=env_for_children(),
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=out, stderr=out), None


def relay_terminal(fd, resize=None, keys=True, detach=None):
    """This process's terminal to ``fd`` (a terminal's master, or a socket to one) and back, as the docker CLI
    does for -it: raw mode (so Ctrl-C travels as a byte and the container's terminal makes it a SIGINT there),
    the window's size sent with ``resize(rows, cols)`` now and on every SIGWINCH, until ``fd`` has nothing more
    to say. Without ``keys`` (-t without -i) nothing typed is sent, and the terminal is left as it is. With
    ``detach`` (the detach keys as bytes, :func:`labkit.wire.words.detach_keys`), typing them ends the relay
    at once and returns True: the program goes on without this terminal. The terminal's settings are
    restored however it ends."""
    import select
    import termios
    import tty
    stdin, stdout = 0, 1
    saved = termios.tcgetattr(stdin) if keys and os.isatty(stdin) else None

    def winch(*_):
        if resize is not None and os.isatty(stdout):
            size = os.get_terminal_size(stdout)
            try:
                resize(size.lines, size.columns)
            except Exception:  # noqa: BLE001 - a size not set is no reason to end the session
                pass
    previous = signal.signal(signal.SIGWINCH, winch)
    reading = keys
    watch = Detach(detach) if detach and keys else None
    try:
        if saved is not None:
            tty.setraw(stdin)
        winch()
        while True:
            ready, _, _ = select.select([fd] + ([stdin] if reading else []), [], [])
            if fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's last holder has gone
                    break
                if not data:
                    break
                kernel.write_all(stdout, data)
            if reading and stdin in ready:
                data = os.read(stdin, 65536)
                if not data:
                    reading = False  # our input ended; the container's output may go on
                    continue
                detached = False
                if watch is not None:
                    data, detached = watch.feed(data)
                kernel.write_all(fd, data)
                if detached:
                    return True
        return False
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)


@contextlib.contextmanager
def terminal_signals_to_child():
    """While a child has this terminal: Ctrl-C and Ctrl-\\ are the child's to act on (the terminal sends them to
    the whole foreground group), not a KeyboardInterrupt here. A handler, not SIG_IGN: exec resets handlers
    to the default, an ignored signal would stay ignored in the child."""
    keep = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        yield
    finally:
        for s, h in keep.items():
            signal.signal(s, h)


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
            kernel.clean_for_exec()
            if spec.get("tty"):  # a terminal of the container's own, its master to the daemon (stdin: the socket)
                kernel.console_here(0)
            if spec.get("cap_keep") is not None:
                kernel.drop_capabilities(spec["cap_keep"])
            args = [str(a) for a in spec["argv"]]
            os.execvpe(args[0], args, dict(spec.get("env") or {}))
        except OSError as exc:
            sys.stderr.write(f"labkit exec: {spec['argv'][0]}: {exc.strerror}\n")
            sys.stderr.flush()
            os._exit(127 if exc.errno == errno.ENOENT else 126)  # Docker's codes
        os._exit(126)
    return kernel.wait_exit_code(child)


if __name__ == "__main__":
    sys.exit(main())
