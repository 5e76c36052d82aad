#!/usr/bin/env bash
# Fetch an aarch64 guest for the tests on an x86_64 machine (or an x86_64 guest on aarch64): the
# distribution's cloud kernel and static busybox for the other architecture, unpacked into
# /var/cache/labkit-foreign/<arch>/root. The tests boot it under TCG to prove the VM baseline works on
# both architectures. A private apt configuration is used, so the host's dpkg architectures and
# package lists stay as they were. Idempotent. Usage: sudo bash scripts/fetch-foreign-guest.sh
set -euo pipefail
case "$(dpkg --print-architecture)" in
  amd64) arch=arm64; kernel_meta=linux-image-cloud-arm64 ;;
  arm64) arch=amd64; kernel_meta=linux-image-cloud-amd64 ;;
  *) echo "fetch-foreign-guest: nothing to fetch on $(dpkg --print-architecture)"; exit 0 ;;
esac
dest=/var/cache/labkit-foreign/$arch
[ -f "$dest/ok" ] && exit 0
rm -rf "$dest"
mkdir -p "$dest/apt/state/lists/partial" "$dest/apt/cache/archives/partial" "$dest/debs" "$dest/root"
touch "$dest/apt/state/status"
cat > "$dest/apt.conf" <<CONF
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
Dir::State "$dest/apt/state";
Dir::State::status "$dest/apt/state/status";
Dir::Cache "$dest/apt/cache";
CONF
export APT_CONFIG="$dest/apt.conf"
apt-get update -qq
image=$(apt-cache depends "$kernel_meta" | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$image" ] || { echo "fetch-foreign-guest: no kernel behind $kernel_meta for $arch" >&2; exit 1; }
(cd "$dest/debs" && apt-get download -qq "$image" busybox-static 2>/dev/null)
for deb in "$dest"/debs/*.deb; do dpkg-deb -x "$deb" "$dest/root"; done
rm -rf "$dest/apt" "$dest/debs"
touch "$dest/ok"
echo "fetch-foreign-guest: $image and busybox-static for $arch in $dest/root"
