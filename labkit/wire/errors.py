"""Typed errors for labkit, all rooted at :class:`LabkitError`.

Every error carries a ``fix``: one sentence that tells the reader what to do next. Errors cross the
agent/client boundary by name (see :mod:`labkit.wire.protocol`), so a failure inside the agent is raised
in the notebook as the same class with the same message. Standard library only.
"""


class LabkitError(Exception):
    """Base of every labkit error. ``str(err)`` is the message followed by the fix."""

    default_fix = ""

    def __init__(self, message, fix=None, **details):
        super().__init__(message)
        self.message = message
        self.fix = fix if fix is not None else self.default_fix
        self.details = details

    def __str__(self):
        if self.fix:
            return f"{self.message}\n  fix: {self.fix}"
        return self.message

    def to_wire(self):
        return {"type": type(self).__name__, "message": self.message, "fix": self.fix,
                "details": self.details}


class InvalidSpec(LabkitError, ValueError):
    """Bad input from the caller: a name, a path, a namespace, a limit that cannot be used."""


class PrivilegeError(LabkitError):
    """The agent needs root and did not get it."""
    default_fix = ("run the notebook as root, or let this user run the agent with sudo "
                   "(`sudo -n true` must succeed), or connect to the lab VM with labkit.connect('vagrant')")


class UnsupportedHost(LabkitError):
    """The kernel side needs Linux; this host is something else and no VM is configured."""
    default_fix = ("start the lab VM (`cd vagrant && vagrant up`) and connect with "
                   "labkit.connect('vagrant'), or connect to any Linux host with labkit.connect('ssh://user@host')")


class TransportError(LabkitError):
    """The client could not reach or keep talking to the agent."""


class ProtocolError(TransportError):
    """The agent answered something that is not the labkit protocol."""


class AgentTooOld(ProtocolError):
    """The agent speaks an older protocol than this client."""
    default_fix = ("update the labkit checkout on the target (`git pull` in the synced folder) or let "
                   "the client ship its own agent (delete ~/.cache/labkit on the target)")


class CommandFailed(LabkitError):
    """A command run by the agent exited non-zero (like invoke's UnexpectedExit).

    ``stdout`` and ``stderr`` cross the wire with it: the last :data:`WIRE_TAIL` characters of each (the
    end of a failing command's output is where its reason is; the whole stays bounded on the wire)."""

    WIRE_TAIL = 64 << 10

    def __init__(self, argv, exit_code, stderr="", stdout="", fix=None):
        stdout, stderr = _text_tail(stdout, self.WIRE_TAIL), _text_tail(stderr, self.WIRE_TAIL)
        tail = "\n".join((stderr or stdout or "").strip().splitlines()[-8:])
        msg = f"command {argv!r} exited with {exit_code}"
        if tail:
            msg += "; last lines of its output:\n    " + tail.replace("\n", "\n    ")
        super().__init__(msg, fix=fix, argv=list(argv), exit_code=exit_code, stdout=stdout, stderr=stderr)
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        self.stdout = stdout


def _text_tail(text, limit):
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    text = text or ""
    return text if len(text) <= limit else text[-limit:]


class CommandTimeout(LabkitError):
    """A command did not finish within its time limit and was killed."""


class NotFound(LabkitError):
    """A named object (rootfs, process, ...) does not exist on the target."""


class Conflict(LabkitError):
    """The target's state does not allow it now (Docker's 409): a name already in use, an image that a
    container still uses, a container that is already running or still running."""


class MechanismError(LabkitError):
    """A kernel mechanism refused a step (a syscall failed); the message names the step."""


class RegistryError(TransportError):
    """A registry said no, or could not be reached."""


class BuildFailed(LabkitError):
    """A recipe line failed; the message shows the line and the end of its output."""


class UnsafeLayer(LabkitError, ValueError):
    """A layer tar tried something a layer may not do; nothing of it was unpacked."""
    default_fix = "do not use this image: its layer is malformed or malicious"


def from_wire(data):
    """Rebuild an error sent by the agent as the same class (or LabkitError when unknown)."""
    cls = _BY_NAME.get(data.get("type"), LabkitError)
    if cls is CommandFailed:
        d = data.get("details") or {}
        err = LabkitError.__new__(CommandFailed)
        LabkitError.__init__(err, data.get("message", ""), fix=data.get("fix"), **d)
        err.argv, err.exit_code = d.get("argv", []), d.get("exit_code")
        err.stdout, err.stderr = _text_tail(d.get("stdout"), CommandFailed.WIRE_TAIL), \
            _text_tail(d.get("stderr"), CommandFailed.WIRE_TAIL)
        return err
    return cls(data.get("message", "agent error"), fix=data.get("fix"), **(data.get("details") or {}))


_BY_NAME = {c.__name__: c for c in (
    LabkitError, InvalidSpec, PrivilegeError, UnsupportedHost, TransportError, ProtocolError,
    AgentTooOld, CommandFailed, CommandTimeout, NotFound, Conflict, MechanismError, BuildFailed, UnsafeLayer, RegistryError)}
