#!/usr/bin/env bash
# The lab command (README): install labkit, then execute every notebook headless against this
# machine; executed notebooks and charts land in one folder (default ./lab-output).
# Usage: sudo bash scripts/lab.sh [OUTPUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup.sh"
out=${1:-"$here/lab-output"}
exec "$here/.venv/bin/labkit" lab --target local --output "$out"
