"""labkit: build a Linux container one kernel mechanism at a time, then measure it against a VM.

``lab = labkit.connect()`` gives a :class:`labkit.client.lab.Lab` that drives the privileged agent on
the target (this machine as root, this machine through sudo, or a Linux host/VM over SSH).

The package is in layers (ARCHITECTURE.md draws them): :mod:`labkit.wire` (the contract both sides
import), :mod:`labkit.client` (connect, Lab, handles, transports), :mod:`labkit.course` (checks,
grading, isolation, bench, plotting) and :mod:`labkit.agent` (root, standard library only, imports
only the wire). This module and :mod:`labkit.cli` are the front ends that put them together.

The course's short names keep working: ``from labkit import checks``, ``labkit.grading.Checker``,
``import labkit.specs`` are the modules under ``labkit.course``, ``labkit.client`` and ``labkit.wire``
(one module object each, whichever name imported it first).

Importing this package stays standard-library only: the agent is shipped as part of it and runs on a
target's bare ``python3``; host-only dependencies (pandas, matplotlib, paramiko) load lazily.
"""
import importlib
import importlib.machinery
import sys

from .wire.errors import LabkitError  # noqa: F401
from .wire.protocol import VERSION as __version__  # noqa: F401

# short name -> where the module lives
SHORT_NAMES = {
    "errors": "wire.errors", "protocol": "wire.protocol", "specs": "wire.specs",
    "lab": "client.lab", "transport": "client.transport", "records": "client.records",
    "vagrant": "client.vagrant",
    **{name: f"course.{name}" for name in ("checks", "grading", "assign", "isolation", "security", "published",
                                           "plotting", "bench", "runbook")},
}


def connect(target="auto", **options):
    """Connect to a target and return a :class:`~labkit.client.lab.Lab`; see :func:`labkit.client.lab.connect`."""
    from .client.lab import connect as _connect
    return _connect(target, local=_in_process, **options)


def _in_process(timeout=None):
    """This machine's agent: labkit's daemon when it answers on its socket (``labkit daemon start``), else the
    agent's own in-process channel (root on Linux; also with ``LABKIT_DAEMON=off``). The one place the front
    end reaches the agent."""
    import os
    from .wire.specs import DAEMON_SOCKET
    if os.environ.get("LABKIT_DAEMON", "auto") != "off" and os.path.exists(DAEMON_SOCKET):
        from .client.transport import UnixSocket
        from .wire.errors import TransportError
        try:
            return UnixSocket(DAEMON_SOCKET, timeout=timeout, connect_timeout=2)
        except TransportError:
            pass  # a socket left by a daemon that was killed (or dying), or not root's: in-process, as without one
    from .agent.local import InProcess
    return InProcess(timeout=timeout)


class _ShortNames:
    """``import labkit.checks`` gives the very module ``labkit.course.checks`` (not a copy). A meta path finder
    and loader by their methods (importlib.abc would cost every ``labkit`` command some 8 ms of imports)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, short = fullname.partition(".")
        if prefix == __name__ and short in SHORT_NAMES:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{SHORT_NAMES[spec.name.partition('.')[2]]}")

    def exec_module(self, module):
        pass  # the real module ran when it was imported under its own name


if not any(isinstance(f, _ShortNames) for f in sys.meta_path):
    sys.meta_path.append(_ShortNames())


def __getattr__(name):
    """``labkit.bench``, ``labkit.checks``, ... imported when first used (and their pandas with them)."""
    if name in SHORT_NAMES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
