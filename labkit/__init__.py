"""labkit: build a Linux container one kernel mechanism at a time, then measure it against a VM.

``lab = labkit.connect()`` gives a :class:`labkit.lab.Lab` that drives the privileged agent on the
target (this machine as root, this machine through sudo, or a Linux host/VM over SSH).

Importing this package stays standard-library only: the agent is shipped as part of it and runs on a
target's bare ``python3``; host-only dependencies (pandas, matplotlib, paramiko) load lazily.
"""
from .errors import LabkitError  # noqa: F401
from .protocol import VERSION as __version__  # noqa: F401


def connect(target="auto", **options):
    """Connect to a target and return a Lab. See :func:`labkit.transport.open_transport`."""
    from .lab import connect as _connect
    return _connect(target, **options)


def __getattr__(name):
    """``labkit.bench``, ``labkit.isolation``, ... without importing them (and their pandas) up front."""
    if name in ("bench", "isolation", "security", "published", "plotting", "checks", "grading"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
