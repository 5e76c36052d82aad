"""``python -m labkit ...``: the same command as ``labkit ...`` (:func:`labkit.cli.command`)."""
import sys

from .cli import command

sys.exit(command())
