"""``python3 -m labkit.agent``: serve the JSON-lines protocol on stdin/stdout (also the zipapp entry)."""
import sys

from labkit.agent.server import main

if __name__ == "__main__":
    sys.exit(main())
