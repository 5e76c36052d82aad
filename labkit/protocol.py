"""The JSON-lines protocol between the labkit client and the agent. Standard library only.

One JSON object per line, UTF-8. The agent speaks first with a hello::

    {"hello": "labkit-agent", "protocol": 1, "version": "0.1.0", "python": "3.11.2", "euid": 0}

then answers each request in order::

    -> {"id": 7, "method": "doctor", "params": {}}
    <- {"id": 7, "ok": true, "result": {...}}
    <- {"id": 8, "ok": false, "error": {"type": "InvalidSpec", "message": "...", "fix": "..."}}

``PROTOCOL`` grows when a request or result changes shape; a client refuses an agent whose
protocol is older than ``MIN_PROTOCOL`` with :class:`labkit.errors.AgentTooOld`.
"""
import json

from . import errors

PROTOCOL = 1
MIN_PROTOCOL = 1
VERSION = "0.1.0"
HELLO = "labkit-agent"


def encode(obj):
    """One protocol line (bytes, newline-terminated)."""
    return (json.dumps(obj, separators=(",", ":"), default=_default) + "\n").encode("utf-8")


def _default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"cannot send {type(obj).__name__} over the labkit protocol")


def decode(line):
    """Parse one line; anything that is not a JSON object is a ProtocolError."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    try:
        obj = json.loads(line)
    except ValueError:
        raise errors.ProtocolError(
            f"the agent sent a line that is not JSON: {line[:200]!r}",
            fix="something on the target prints to the agent's stdout (a login banner, a shell rc "
                "file); make the non-interactive shell quiet or use the in-process/sudo transport") from None
    if not isinstance(obj, dict):
        raise errors.ProtocolError(f"the agent sent {type(obj).__name__}, expected an object")
    return obj


def check_hello(hello):
    """Validate the agent's first line; return it."""
    if hello.get("hello") != HELLO:
        raise errors.ProtocolError(f"expected a labkit agent hello, got {hello!r}")
    proto = hello.get("protocol")
    if not isinstance(proto, int) or proto < MIN_PROTOCOL:
        raise errors.AgentTooOld(
            f"the agent on the target speaks protocol {proto} (version {hello.get('version')}); "
            f"this client needs protocol {MIN_PROTOCOL} or newer (client version {VERSION})")
    return hello


def response(req_id, result=None, error=None):
    if error is not None:
        return {"id": req_id, "ok": False, "error": error}
    return {"id": req_id, "ok": True, "result": result}
