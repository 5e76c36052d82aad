#!/usr/bin/env bash
# The test command (README): install what the tests need, then run the whole suite as root.
# Extra arguments go to pytest, e.g. `sudo bash scripts/test.sh -k namespaces`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup.sh" --dev
cd "$here"
exec "$here/.venv/bin/python" -m pytest "$@"
