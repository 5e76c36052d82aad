#!/usr/bin/env bash
# The lab command (README): install what the labs need (scripts/setup.sh, no test tools), then execute every
# notebook headless against this machine, in English and then in Korean (into DIR/ko); executed notebooks,
# charts and a scores table land in one folder.
# Usage: bash scripts/lab.sh [--output DIR] [--full] [NOTEBOOK ...]   (default: ./lab-output, quick mode)
# As root; from a user account it asks sudo for itself. Exits non-zero when a notebook fails to run.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/as-root.sh"
bash "$here/scripts/setup.sh"
out="$here/lab-output"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --output) out=$2; shift 2 ;;
    --output=*) out=${1#--output=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
"$here/.venv/bin/labkit" lab --target local --output "$out" ${args[@]+"${args[@]}"}
# the Korean edition (한국어판, notebooks/ko): the same code and checks, the prose translated
exec "$here/.venv/bin/labkit" lab --target local --lang ko --output "$out/ko" ${args[@]+"${args[@]}"}
