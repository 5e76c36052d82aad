#!/usr/bin/env bash
# Install everything labkit needs on a Debian/Ubuntu machine, idempotently:
#   - the target side, as in the lab VM (vagrant/provision.sh: busybox-static, iproute2, util-linux, iptables/nft,
#     qemu, crun/runc, and a distro kernel in /boot for the VM baseline when there is none)
#   - a virtual environment in .venv with labkit and its host-side dependencies
#   - with --dev, what the tests need: test tools, sshd, Vagrant + libvirt + debootstrap for the VM tier
#   (and chromium, which the browser test drives)
# Usage: bash scripts/setup.sh [--dev]      (as root; from a user account it asks sudo for itself)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dev=0
[ "${1:-}" = "--dev" ] && dev=1

. "$here/scripts/as-root.sh"

# The target side: exactly what the lab VM gets (vagrant/provision.sh), ending with `labkit doctor`.
bash "$here/vagrant/provision.sh" "$here"

# The host side: a virtual environment; for the tests also sshd, and Vagrant with libvirt for the VM tier.
pkgs=(python3-venv python3-pip)
# The other CPU's qemu: lab 07 boots an aarch64 guest on an x86_64 machine (or the reverse), under TCG.
case "$(dpkg --print-architecture)" in
  amd64) pkgs+=(qemu-system-arm) ;;
  arm64) pkgs+=(qemu-system-x86) ;;
esac
[ "$dev" = 1 ] && pkgs+=(openssh-server openssh-client vagrant vagrant-libvirt libvirt-daemon-system
                         libvirt-daemon-driver-qemu libvirt-clients dnsmasq-base dbus debootstrap e2fsprogs
                         qemu-utils rsync skopeo docker-registry crun runc tmux docker.io chromium)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ] && ! command -v apt-get >/dev/null 2>&1; then
  echo "labkit setup: no apt-get here to install ${missing[*]}; going on with what this host has" >&2
elif [ "${#missing[@]}" -gt 0 ]; then
  echo "labkit setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Do not let package scripts start services (sshd, libvirtd): the tests start their own.
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
# (the install mode is part of the stamp: an install of another mode is redone)
want=$(sha256sum < "$here/pyproject.toml" | cut -c1-16)c
have=$(cat "$stamp" 2>/dev/null || true)
if [ "${have%-*}" != "$want" ] || { [ "$dev" = 1 ] && [ "${have##*-}" != 1 ]; }; then
  echo "labkit setup: installing labkit and its dependencies into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  if [ "$dev" = 1 ]; then extra="[dev]"; else extra=""; fi
  # editable as a plain path in a .pth file ("compat"): setuptools' default editable finder imports pathlib,
  # importlib.util and more at every interpreter start, some 20 ms of each labkit command and Jupyter kernel
  "$venv/bin/python" -m pip install -q -e "$here$extra" --config-settings editable_mode=compat
  echo "$want-$dev" > "$stamp"
fi

# The other architecture's kernel and busybox: lab 07 shows that a container cannot run them and a VM can (TCG).
if [ "$dev" = 1 ]; then
  bash "$here/scripts/fetch-foreign-guest.sh"  # (the tests need it)
else
  bash "$here/scripts/fetch-foreign-guest.sh" || echo "labkit setup: could not fetch the other architecture's guest" \
    "(offline?): lab 07 says so and goes on" >&2
fi
exit 0
