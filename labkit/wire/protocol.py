"""The JSON-lines protocol between the labkit client and the agent. Standard library only.

One JSON object per line, UTF-8. The agent speaks first with a hello::

    {"hello": "labkit-agent", "protocol": 1, "version": "0.1.0", "python": "3.11.2", "euid": 0}

then answers each request in order::

    -> {"id": 7, "method": "doctor", "params": {}}
    <- {"id": 7, "ok": true, "result": {...}}
    <- {"id": 8, "ok": false, "error": {"type": "InvalidSpec", "message": "...", "fix": "..."}}

A line the agent cannot read (not JSON, too long, nested too deep) is answered with ``"id": null`` and
a ProtocolError: the agent could not learn its id, and it goes on to the next line.

Both ends bound what they accept: a line is at most :data:`MAX_LINE` bytes with its newline and its
lists and objects nest at most :data:`MAX_DEPTH` deep; a sender refuses to send more, a reader refuses
to read more (without holding more than ``MAX_LINE`` bytes of it) and names who sent it.

``PROTOCOL`` grows when a request or result changes shape; a client refuses an agent whose
protocol is older than ``MIN_PROTOCOL`` with :class:`labkit.wire.errors.AgentTooOld`.
"""
import json

from . import errors

PROTOCOL = 2
MIN_PROTOCOL = 2  # 2: specs travel as one 'spec' object (rootfs, process, cgroup, network, container)
VERSION = "0.1.0"
HELLO = "labkit-agent"

#: the longest line either side sends or reads, newline included (a generous bound for big results)
MAX_LINE = 64 << 20
#: how deep lists and objects may nest in one line (labkit's own requests and results need about ten)
MAX_DEPTH = 100

#: seconds the client waits for an answer, unless the call or the transport says otherwise
DEFAULT_TIMEOUT = 600.0
#: seconds the client waits for the agent's hello after starting it
HELLO_TIMEOUT = 120.0
#: seconds for requests that boot VMs, run benchmarks or move images (each may take many minutes)
SLOW_TIMEOUT = 3600.0
#: the first line a grader sends to a restored grading VM's agent (:mod:`labkit.agent.vmsandbox`), before its hello
VM_START = "LKSTART"


def vm_start_line():
    """``LKSTART <ns since the epoch> <64 hex digits>``: the real time and fresh random bytes for a guest restored
    from a snapshot (every restored guest would otherwise share the snapshot's clock and random state)."""
    import secrets
    import time
    return f"{VM_START} {time.time_ns()} {secrets.token_hex(32)}\n".encode()


#: methods (or 'prefix.' for a whole family) that get SLOW_TIMEOUT
SLOW_METHODS = ("bench.", "vm.", "image.build", "image.pull", "image.push", "image.import", "image.export",
                "cleanup")
#: seconds on top of a request's own ``timeout`` / ``seconds`` parameter (the agent's setup and teardown)
TIMEOUT_GRACE = 120.0

_SIDES = ("client", "agent")


def _mib(n):
    return f"{n / (1 << 20):g} MiB"


def _fixes(sender):
    """What to do about a bad line, depending on who sent it."""
    if sender == "agent":
        return {
            "json": "something on the target prints to the agent's stdout (a login banner, a shell rc "
                    "file); make the non-interactive shell quiet or use the in-process/sudo transport",
            "deep": "the agent on the target is not this labkit's agent, or it is broken: update labkit on the "
                    "target (`git pull` in the synced folder) and reconnect with labkit.connect(...)",
            "long": "ask for less in one request (e.g. read_file with a smaller limit, container logs from an "
                    "offset), then reconnect with labkit.connect(...)",
        }
    return {
        "json": "send one JSON object per line (labkit.wire.protocol.encode): talk to the agent through "
                "labkit.connect(...), not by writing to its stdin",
        "deep": f"send plain data: lists and objects nested at most {MAX_DEPTH} deep (no labkit request needs "
                f"more)",
        "long": f"send less in one request (at most {_mib(MAX_LINE)} a line): put big data in a file on the "
                f"target and pass its path",
    }


def _side(sender):
    if sender not in _SIDES:
        raise ValueError(f"sender must be one of {_SIDES}, not {sender!r}")
    return sender


def too_deep(obj, limit=None):
    """True when lists/objects (tuples too) in ``obj`` nest deeper than ``limit`` (MAX_DEPTH); iterative."""
    limit = MAX_DEPTH if limit is None else limit
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return False


def deep_error(sender, action="sent"):
    return errors.ProtocolError(f"the {sender} {action} a line whose lists/objects nest more than {MAX_DEPTH} deep",
                                fix=_fixes(sender)["deep"])


def long_error(sender, size=None, action="sent"):
    what = f"of {size} bytes, more" if size is not None else "longer"
    return errors.ProtocolError(f"the {sender} {action} a line {what} than the protocol's limit of "
                                f"{MAX_LINE} bytes ({_mib(MAX_LINE)})", fix=_fixes(sender)["long"])


def encode(obj, sender="client"):
    """One protocol line (bytes, newline-terminated); a ProtocolError when ``obj`` cannot go on the wire
    (not JSON data, nested deeper than MAX_DEPTH, longer than MAX_LINE)."""
    sender = _side(sender)
    if too_deep(obj):
        raise deep_error(sender, "tried to send")
    try:
        text = json.dumps(obj, separators=(",", ":"), default=_default)
    except RecursionError:
        raise deep_error(sender, "tried to send") from None
    except (TypeError, ValueError) as exc:
        raise errors.ProtocolError(
            f"the {sender} tried to send something that is not JSON data: {exc}",
            fix="pass plain data (str, int, float, bool, None, lists and dicts of them)" if sender == "client"
            else "this is an agent bug: report it with the method that was called") from None
    data = (text + "\n").encode("utf-8")
    if len(data) > MAX_LINE:
        raise long_error(sender, len(data), "tried to send")
    return data


def _default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"cannot send {type(obj).__name__} over the labkit protocol")


def decode(line, sender="agent"):
    """Parse one line that ``sender`` ('agent' or 'client') sent; anything that is not a JSON object, or
    is longer than MAX_LINE, or nests deeper than MAX_DEPTH, is a ProtocolError that names the sender."""
    sender = _side(sender)
    if len(line) > MAX_LINE:
        raise long_error(sender, len(line))
    if isinstance(line, (bytes, bytearray)):
        line = line.decode("utf-8", "replace")
    try:
        obj = json.loads(line)
    except RecursionError:
        raise deep_error(sender) from None
    except ValueError as exc:
        raise errors.ProtocolError(f"the {sender} sent a line that is not JSON ({exc}): {line[:200]!r}",
                                   fix=_fixes(sender)["json"]) from None
    if not isinstance(obj, dict):
        raise errors.ProtocolError(f"the {sender} sent {type(obj).__name__}, expected an object",
                                   fix=_fixes(sender)["json"])
    if too_deep(obj):
        raise deep_error(sender)
    return obj


def request_timeout(method, params, base=None):
    """Seconds a client waits for the answer to ``method(**params)``: ``base`` (DEFAULT_TIMEOUT), at least
    SLOW_TIMEOUT for SLOW_METHODS, and at least the request's own ``timeout``/``seconds`` plus TIMEOUT_GRACE."""
    t = float(DEFAULT_TIMEOUT if base is None else base)
    if isinstance(method, str) and any(method == m or (m.endswith(".") and method.startswith(m))
                                       for m in SLOW_METHODS):
        t = max(t, SLOW_TIMEOUT)
    for key in ("timeout", "seconds"):
        v = (params or {}).get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            t = max(t, float(v) + TIMEOUT_GRACE)
    return t


def check_hello(hello):
    """Validate the agent's first line; return it."""
    if hello.get("hello") != HELLO:
        raise errors.ProtocolError(f"expected a labkit agent hello, got {repr(hello)[:300]}",
                                   fix="the command that starts the agent runs something else: check it on the target")
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
