"""The in-process channel: the agent's code answers in this very process (root on Linux).

The fastest way to the agent and the one CI and grading servers use: no subprocess, no pipe, but every
request and answer still goes through the wire's encoding, so it behaves exactly as over SSH. Also
``run_attached`` and ``exec_attached``: a container (or a command in one) given this terminal (``labkit run
-it``, ``labkit exec -it``), which only works here.
The front ends (:func:`labkit.connect`, :mod:`labkit.cli`) are the only code outside the agent that
imports this module.
"""
import os
import sys

from ..wire import protocol
from ..wire.channel import Channel
from ..wire.errors import LabkitError, PrivilegeError, UnsupportedHost


class InProcess(Channel):
    """The agent's code runs in this process (which must be root on Linux)."""

    name = "in-process"

    def __init__(self, timeout=None):
        super().__init__(timeout)
        from . import server
        if sys.platform != "linux":
            raise UnsupportedHost(f"the in-process transport needs Linux; this is {sys.platform}")
        if os.geteuid() != 0:
            raise PrivilegeError(f"the in-process transport needs root; this process runs as uid {os.geteuid()}",
                                 fix="use labkit.connect('sudo') (the agent runs under sudo) or run as root")
        self._server = server
        self.hello = protocol.check_hello(protocol.decode(server.encode_answer(server._hello()), sender="agent"))

    def _roundtrip(self, req, line, timeout):
        # the agent's code runs in this thread: no time limit applies beyond the agent's own
        try:
            request = protocol.decode(line, sender="client")
        except LabkitError as exc:
            answer = protocol.response(None, error=exc.to_wire())
        else:
            answer = self._server.handle(request)
        return protocol.decode(self._server.encode_answer(answer), sender="agent")


def run_attached(cid, detach=None):
    """Attach this terminal to container ``cid`` and run it to its end; its exit code (or
    :data:`labkit.wire.words.DETACHED`: its client left with the ``detach`` keys, bytes, and it goes on)."""
    from . import engine
    return engine.run_attached(cid, detach=detach)


def attach_here(ref, detach=None):
    """`attach`: this terminal to running container ``ref``'s; its exit code, or DETACHED."""
    from . import engine
    return engine.attach_here(ref, detach=detach)


def auto_remove(ref):
    """`run --rm` for a container left running by a detach: removed when it ends."""
    from . import engine
    return engine.auto_remove(ref)


def exec_attached(ref, argv, stdin=True, tty=False):
    """`exec -it`: ``argv`` in running container ``ref`` with this terminal (``stdin`` False: -t alone); its exit
    code."""
    from . import engine
    return engine.exec_attached(ref, argv, stdin, tty)


def daemon_control(action, docker_api=True):
    """labkit's daemon on this machine, for the front ends (``labkit daemon``, ``labkit cleanup``):
    ``start`` / ``stop`` / ``status`` / ``run`` / ``answers`` (see :mod:`labkit.agent.daemon`)."""
    from . import daemon
    if action == "start":
        return daemon.start(docker_api=docker_api)
    if action == "run":
        return daemon.run(docker_api=docker_api)
    if action == "stop":
        return daemon.stop()
    if action == "answers":
        return daemon.answers()
    if action == "status":
        return daemon.status()
    raise ValueError(f"no daemon action {action!r}")
