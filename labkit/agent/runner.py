"""The one choke point through which the agent runs programs and records what it did.

``run(argv)`` executes a command (argv as a list, never a shell string) and returns a
:class:`Result` with stdout, stderr, exit code and duration; ``start(argv)`` starts one without
waiting and hands back its :class:`subprocess.Popen`, for a child the caller must own (one that
outlives the call, or whose pipes stream: the launcher, the fork server, a listener); ``helper_argv``
builds the argv of an agent helper (``labkit.agent.launch``, ``enter``, ``forkserver``) run from the
sealed interpreter, and ``start_helper`` starts one. ``Recorder`` collects the steps of one operation
(commands *and* syscalls, with their arguments; :meth:`Recorder.syscall` writes every syscall step)
together with the facts it established, so that a notebook can show exactly what happened and nothing
that did not. ``same_process`` is the one test of whether a pid read back from a state entry (written
with :func:`pid_fields`) is still the process that was started.

Programs the agent may start without this module (each call site has a comment pointing here):

- the timed start-up samples in :func:`labkit.agent.measure.startup_sample` (a plain ``/bin/true``,
  ``unshare``, crun/runc): the figure is the cost of starting a process, so the runner's own work
  (environment, pipes, decoding) must not be counted in it.

Standard library only.
"""
import errno as _errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from ..wire.errors import CommandFailed, CommandTimeout, InvalidSpec

#: PATH used for every command the agent runs (sudo and sshd may hand us a minimal one).
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Result:
    """What one command did: argv, exit code, stdout, stderr, duration in seconds."""

    __slots__ = ("argv", "exit_code", "stdout", "stderr", "duration")

    def __init__(self, argv, exit_code, stdout, stderr, duration):
        self.argv, self.exit_code, self.stdout, self.stderr, self.duration = (
            list(argv), exit_code, stdout, stderr, duration)

    @property
    def ok(self):
        return self.exit_code == 0

    def to_step(self):
        return {"kind": "command", "argv": self.argv, "exit_code": self.exit_code,
                "stdout": self.stdout, "stderr": self.stderr, "duration": self.duration}

    def to_dict(self):
        return {"argv": self.argv, "exit_code": self.exit_code, "stdout": self.stdout,
                "stderr": self.stderr, "duration": self.duration}


def which(name):
    return shutil.which(name, path=SAFE_PATH)


def _argv_env(argv, env):
    """The checked argv (strings) and the environment every command gets (``env`` on top)."""
    if isinstance(argv, str) or not argv:
        raise InvalidSpec(f"a command must be a non-empty list of arguments, got {argv!r}",
                          fix="pass argv as a list, e.g. ['ls', '-l', '/']")
    full_env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    if env:
        full_env.update(env)
    return [str(a) for a in argv], full_env


def _not_found(argv, fix):
    return CommandFailed(argv, 127, f"{argv[0]}: command not found",
                         fix=fix or f"install the program that provides {argv[0]!r} on the target "
                                    "(`sudo bash scripts/setup.sh` or vagrant/provision.sh)")


def run(argv, *, input=None, timeout=60, check=True, env=None, recorder=None, fix=None, cwd=None, pass_fds=()):
    """Run ``argv`` and return a :class:`Result`; raise CommandFailed/CommandTimeout on failure.

    ``recorder`` (a :class:`Recorder`) gets the step whether it succeeded or not.
    """
    argv, full_env = _argv_env(argv, env)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, input=input if input is None else input.encode(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=None if input else subprocess.DEVNULL,
                              timeout=timeout, env=full_env, cwd=cwd, start_new_session=True, pass_fds=pass_fds)
    except FileNotFoundError:
        res = Result(argv, 127, "", f"{argv[0]}: command not found", time.perf_counter() - start)
        if recorder is not None:
            recorder.add(res.to_step())
        if check:
            raise _not_found(argv, fix) from None
        return res
    except subprocess.TimeoutExpired as exc:
        if recorder is not None:
            recorder.add({"kind": "command", "argv": argv, "exit_code": None, "stdout": "",
                          "stderr": f"killed after {timeout} s", "duration": time.perf_counter() - start})
        raise CommandTimeout(f"command {argv!r} did not finish within {timeout} s and was killed",
                             fix="make the command finish sooner or pass a longer timeout") from exc
    res = Result(argv, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                 proc.stderr.decode("utf-8", "replace"), time.perf_counter() - start)
    if recorder is not None:
        recorder.add(res.to_step())
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, res.stderr, res.stdout, fix=fix)
    return res


def start(argv, *, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=None,
          cwd=None, new_session=True, pass_fds=(), recorder=None, fix=None, as_user=None):
    """Start ``argv`` without waiting for it; returns its :class:`subprocess.Popen`, which the caller owns (waits
    for, reads from, kills). Streams as for subprocess (PIPE, DEVNULL, a file, or None to share the agent's);
    the same argv check and environment as :func:`run`; a missing program is a CommandFailed.

    ``new_session`` puts the child in a session (and process group) of its own, so that a group kill reaches
    all it starts and a terminal's signals do not. ``recorder`` gets a command step with no exit code and no
    output (it was started, and this call does not know how it ends).

    ``as_user``: (uid, gid) the program runs as, with no supplementary groups (a service that need not be root)."""
    argv, full_env = _argv_env(argv, env)
    ids = {} if as_user is None else {"user": as_user[0], "group": as_user[1], "extra_groups": []}
    try:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=full_env, cwd=cwd,
                                start_new_session=new_session, pass_fds=pass_fds, **ids)
    except FileNotFoundError:
        raise _not_found(argv, fix) from None
    if recorder is not None:
        recorder.add({"kind": "command", "argv": argv, "exit_code": None, "stdout": "", "stderr": "",
                      "duration": 0})
    return proc


class Recorder:
    """Collects the steps of one operation and the facts it established.

    A step is a dict: ``{"kind": "command", "argv": [...], ...}`` from :func:`run`, or
    ``{"kind": "syscall", "call": "unshare", "args": [...], "result": 0, "errno": None, "duration": ...}``
    from :meth:`syscall` (which :mod:`labkit.agent.kernel` and every other recorded syscall use), or
    ``{"kind": "file", "op": "write", "path": ...}`` from :meth:`file`.
    """

    def __init__(self, what):
        self.what = what
        self.steps = []
        self.facts = {}
        self.started = time.perf_counter()

    def add(self, step):
        self.steps.append(step)
        return step

    def file(self, op, path, detail=""):
        self.add({"kind": "file", "op": op, "path": str(path), "detail": detail})

    def syscall(self, call, args=(), result=0, errno=None, duration=0, **extra):
        """Record one syscall: ``call`` with ``args`` spelled as the man page does, its ``result``, ``errno`` (a
        number or its symbolic name; None when it succeeded) and ``duration`` in seconds; ``extra`` keys come
        after those (e.g. which capabilities a drop dropped). Returns the step."""
        if isinstance(errno, int):
            errno = _errno.errorcode.get(errno, str(errno)) if errno else None
        step = {"kind": "syscall", "call": call, "args": list(args), "result": result, "errno": errno,
                "duration": duration}
        step.update(extra)
        return self.add(step)

    def kill(self, pid, sig):
        """Send ``sig`` to ``pid`` (checked by the caller to be the process it started) and record the kill;
        a process that is already gone is not an error (nothing is recorded). True when it was sent."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        self.syscall("kill", [pid, signal.Signals(sig).name])
        return True

    def run(self, argv, **kw):
        return run(argv, recorder=self, **kw)

    def fact(self, key, value):
        self.facts[key] = value
        return value

    def to_dict(self, **extra):
        out = {"what": self.what, "steps": self.steps, "facts": self.facts,
               "duration": time.perf_counter() - self.started}
        out.update(extra)
        return out


def read_text(path, default=None):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return default


def proc_stat(pid):
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses), so that
    ``[0]`` is the state letter, ``[1]`` the parent's pid and ``[19]`` the start time; None when there is no such
    process (or the file is not what the kernel writes)."""
    stat = read_text(f"/proc/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields if len(fields) > 19 and fields[19].isdigit() else None


def pid_starttime(pid):
    """The process's start time (clock ticks since boot), to tell a pid from a recycled one; None without it."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None


def same_process(pid, starttime):
    """True when ``pid`` is still the process that had ``starttime`` (not a recycled pid, not a reboot's
    new process, not a zombie): the only test before signalling a pid read from a state file."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or starttime is None:
        return False
    fields = proc_stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X") and int(fields[19]) == starttime


def pid_fields(pid, key="pid"):
    """How a state entry records a process that may be signalled later: ``{key: pid, key's start time}``, the
    start time under ``starttime`` for the key "pid" and ``<key>_starttime`` for any other (both None without
    a pid). :func:`recorded_process` reads it back."""
    return {key: pid, _starttime_key(key): pid_starttime(pid) if pid else None}


def recorded_process(entry, key="pid"):
    """The pid recorded in ``entry`` under ``key`` (by :func:`pid_fields`) when it is still that very process
    (:func:`same_process`), else None."""
    pid = entry.get(key)
    return pid if same_process(pid, entry.get(_starttime_key(key))) else None


def _starttime_key(key):
    return "starttime" if key == "pid" else f"{key}_starttime"


def wait_gone(pid, starttime, timeout):
    """Wait up to ``timeout`` seconds for ``pid`` to stop being the process that had ``starttime`` (it ended,
    even if still a zombie nobody reaped); True when it has."""
    end = time.monotonic() + timeout
    while same_process(pid, starttime):
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)
    return True


def env_for_children():
    """Environment that lets a child python find this labkit package (plain checkout or zipapp) and, started
    from the sealed copy (:func:`helper_argv`), its own standard library."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    home = sys.base_prefix if sys.base_exec_prefix == sys.base_prefix else f"{sys.base_prefix}:{sys.base_exec_prefix}"
    return {"PYTHONPATH": here, "PATH": SAFE_PATH, "LANG": "C.UTF-8", "PYTHONHOME": home}


SEALED_NAME = "labkit-python"
_sealed = {"pid": None, "fd": None}
_sealed_lock = threading.Lock()


def sealed_python():
    """A file descriptor of a sealed in-memory copy of this Python's binary (a memfd that can no longer be
    written, resized or unsealed), made once per agent process.

    The agent starts every helper that ends up inside a container (the launcher, its fork server, ``enter``)
    from this copy, so that there /proc/self/exe names the copy and not the host's python binary: otherwise
    a container's root could exec /proc/self/exe (or a script whose interpreter it is) and chmod or rewrite
    the host's interpreter through it (runc's CVE-2019-5736, which runc answers the same way)."""
    with _sealed_lock:
        if _sealed["pid"] != os.getpid():
            fd = os.memfd_create(SEALED_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            with open(os.path.realpath(sys.executable), "rb") as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
            _sealed.update(pid=os.getpid(), fd=fd)
        return _sealed["fd"]


def helper_argv(module, *args):
    """(argv, pass_fds) that run the agent's helper module ``module`` (``"launch"``, ``"enter"``, ``"forkserver"``)
    with ``args``, as ``python -m labkit.agent.<module>``, from this Python's sealed copy (:func:`sealed_python`).
    The one place such an argv is made; run it with :func:`env_for_children` (:func:`start_helper` does)."""
    try:  # a helper that starts a helper (the supervisor): it runs from the sealed copy already, and the copy's
        # path cannot be opened again to copy it (it reads /memfd:labkit-python (deleted))
        if os.readlink("/proc/self/exe").startswith(f"/memfd:{SEALED_NAME}"):
            return ["/proc/self/exe", "-m", f"{__package__}.{module}", *[str(a) for a in args]], ()
    except OSError:
        pass
    fd = sealed_python()
    return [f"/proc/self/fd/{fd}", "-m", f"{__package__}.{module}", *[str(a) for a in args]], (fd,)


def start_helper(module, *args, **kw):
    """:func:`start` the helper ``module`` with ``args`` (:func:`helper_argv`) in :func:`env_for_children`;
    ``kw`` as for :func:`start`."""
    argv, fds = helper_argv(module, *args)
    return start(argv, pass_fds=fds, env=env_for_children(), **kw)


def close_sealed_python():
    """In a helper started by :func:`helper_argv`: the copy it runs from stays out of the programs it execs."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(f"/memfd:{SEALED_NAME}"):
                os.set_inheritable(int(name), False)
        except OSError:
            continue
