"""``python -m labkit ...``: the same command as ``labkit ...`` (:func:`labkit.cli.main`)."""
import sys

from .cli import main

sys.exit(main())
