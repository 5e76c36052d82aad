#!/usr/bin/env bash
# Install everything labkit needs on a Debian/Ubuntu machine, idempotently:
#   - Debian packages for the target side (busybox-static, iproute2, util-linux, iptables/nft, qemu, sshd, sudo)
#   - a virtual environment in .venv with labkit and its host-side dependencies (and test tools with --dev)
# Usage: sudo bash scripts/setup.sh [--dev]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dev=0
[ "${1:-}" = "--dev" ] && dev=1

if [ "$(id -u)" != 0 ]; then
  echo "labkit setup: run me as root (sudo bash scripts/setup.sh): I install Debian packages." >&2
  exit 1
fi

pkgs=(busybox-static iproute2 util-linux procps kmod psmisc iptables nftables sudo
      python3 python3-venv python3-pip qemu-system-x86 qemu-utils)
[ "$(uname -m)" = aarch64 ] && pkgs=("${pkgs[@]/qemu-system-x86/qemu-system-arm}")
[ "$dev" = 1 ] && pkgs+=(openssh-server openssh-client)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "labkit setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Do not let package scripts start services (sshd, ...): the tests start their own on 127.0.0.1.
  policy=/usr/sbin/policy-rc.d; made_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; made_policy=1; fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$made_policy" = 1 ] && rm -f "$policy"
fi

venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "labkit setup: creating $venv"
  /usr/bin/python3 -m venv "$venv"
fi
# Reinstall only when pyproject.toml changed, or when test tools are wanted and not yet there.
stamp="$venv/.labkit-installed"
want=$(sha256sum < "$here/pyproject.toml" | cut -c1-16)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "${have%-*}" != "$want" ] || { [ "$dev" = 1 ] && [ "${have##*-}" != 1 ]; }; then
  echo "labkit setup: installing labkit and its dependencies into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  if [ "$dev" = 1 ]; then extra="[dev]"; else extra=""; fi
  "$venv/bin/python" -m pip install -q -e "$here$extra"
  echo "$want-$dev" > "$stamp"
fi
