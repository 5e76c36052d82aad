#!/usr/bin/env bash
# The test command (README): install what the tests need (scripts/setup.sh --dev), then run the whole suite
# as root. As root; from a user account it asks sudo for itself.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k namespaces`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/as-root.sh"
bash "$here/scripts/setup.sh" --dev
cd "$here"
exec "$here/.venv/bin/python" -m pytest "$@"
