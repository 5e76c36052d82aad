"""A channel: one request out, one answer back, within a time limit.

``Channel`` is the base of every way a request reaches the agent: the client's transports
(:mod:`labkit.client.transport`: a subprocess under sudo, SSH) and the agent's own in-process channel
(:mod:`labkit.agent.local`). It numbers requests, encodes them (:mod:`.protocol`), applies the time
limit, matches the answer to its request and turns an error answer back into its typed exception.
A subclass supplies ``_roundtrip(req, line, timeout) -> answer``. Standard library only.
"""
import itertools
import os
import threading

from . import protocol
from .errors import InvalidSpec, ProtocolError, from_wire


class Channel:
    """Base: ``call(method, **params)`` sends one request and returns the result or raises.

    Each request waits for its answer at most a time limit (:func:`labkit.wire.protocol.request_timeout`):
    ``_timeout=SECONDS`` on one call, else ``transport.timeout`` (or ``$LABKIT_TIMEOUT``) as the base for
    every call, raised for slow methods (VM boots, benchmarks, image transfers) and for a request's own
    ``timeout``. ``math.inf`` waits for ever. A call that runs out of time raises TransportError; the
    agent's late answer is dropped when it comes, and the transport stays usable."""

    name = "channel"

    def __init__(self, timeout=None):
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.hello = None
        self.timeout = timeout

    def _timeout_for(self, method, params, override):
        if override is not None:
            if isinstance(override, bool) or not isinstance(override, (int, float)) or not override > 0:
                raise InvalidSpec(f"_timeout={override!r} is not a number of seconds",
                                  fix="pass seconds > 0, e.g. _timeout=3600 (math.inf waits for ever)")
            return float(override)
        base = self.timeout
        if base is None and os.environ.get("LABKIT_TIMEOUT"):
            try:
                base = float(os.environ["LABKIT_TIMEOUT"])
            except ValueError:
                raise InvalidSpec(f"LABKIT_TIMEOUT={os.environ['LABKIT_TIMEOUT']!r} is not a number of seconds",
                                  fix="set it to seconds, e.g. LABKIT_TIMEOUT=1800, or unset it") from None
        return protocol.request_timeout(method, params, base)

    def call(self, method, _timeout=None, **params):
        req = {"id": next(self._ids), "method": method, "params": params}
        timeout = self._timeout_for(method, params, _timeout)
        line = protocol.encode(req, sender="client")  # refused here when it cannot go on the wire
        with self._lock:
            answer = self._roundtrip(req, line, timeout)
        if answer.get("id") is None and answer.get("ok") is False:
            raise from_wire(answer.get("error") or {})  # the agent could not read the request's line
        if answer.get("id") != req["id"]:
            raise ProtocolError(f"the agent answered request {answer.get('id')!r} to request {req['id']}",
                                fix="reconnect with labkit.connect(...); if it repeats, update labkit on the target")
        if answer.get("ok"):
            return answer.get("result")
        raise from_wire(answer.get("error") or {})

    def _roundtrip(self, req, line, timeout):
        raise NotImplementedError

    def close(self):
        pass

    def describe(self):
        return self.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
