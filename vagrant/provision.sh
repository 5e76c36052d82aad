#!/usr/bin/env bash
# Provision a Linux host for labkit's agent and the course, idempotently, then self-test with `labkit doctor`.
# Serves the lab VM (Vagrant runs it as root) and any Debian/Ubuntu host (amd64 or arm64) a student or
# instructor brings:   sudo bash vagrant/provision.sh [--jupyter] [--cluster-key=FILE | --worker=FILE --manager=ADDRESS] [REPO_DIR]
#   --jupyter   also install JupyterLab and run it as a service for the `vagrant` (or SUDO_USER) user
#               on port 8888, so that a browser on the laptop can use the VM's forwarded port; its token is
#               made at random on the first run and kept in /etc/labkit/jupyter-token (root and that user)
#   --cluster-key=FILE   (the manager of several VMs, lab 09) FILE is the private key with which this machine's
#               labkit reaches its worker machines; kept as /etc/labkit/cluster/id_rsa (root only)
#   --worker=FILE        (a worker VM, lab 09) FILE is that key's public half: the user labkit-node may log in
#               with it and run one command only, labkit's agent as root (its forced command, one sudo rule);
#               /etc/labkit/cluster/worker marks this machine as one its cluster may power off
#   --manager=ADDRESS    (with --worker) the only address that key is accepted from (the manager VM's)
#   REPO_DIR    the labkit checkout (default: the folder above this script; /labkit in the VM)
set -euo pipefail

jupyter=0
repo=""
cluster_key=""
worker_key=""
manager=""
for arg in "$@"; do
  case "$arg" in
    --jupyter) jupyter=1 ;;
    --cluster-key=?*) cluster_key=${arg#--cluster-key=} ;;
    --worker=?*) worker_key=${arg#--worker=} ;;
    --manager=?*) manager=${arg#--manager=} ;;
    -*) echo "provision.sh: unknown option $arg" >&2; exit 2 ;;
    *) repo=$arg ;;
  esac
done
for f in "$cluster_key" "$worker_key"; do
  if [ -n "$f" ] && [ ! -s "$f" ]; then
    echo "provision.sh: $f is not a key file (the Vagrantfile copies the cluster's key in)" >&2
    exit 2
  fi
done
[ -n "$repo" ] || repo=$(cd "$(dirname "$0")/.." && pwd)

# install_unit NAME < UNIT_TEXT: a systemd unit written when its text changed (then systemd reloads them);
# true when it changed, false when it was already so
install_unit() {
  local unit=/etc/systemd/system/$1
  cat > "$unit.new"
  if cmp -s "$unit.new" "$unit"; then
    rm -f "$unit.new"
    return 1
  fi
  mv -f "$unit.new" "$unit"
  systemctl daemon-reload
}

if [ "$(id -u)" != 0 ]; then
  echo "provision.sh: run me as root (sudo bash vagrant/provision.sh): I install packages." >&2
  exit 1
fi
have_apt=1
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
  have_apt=0
  echo "provision.sh: this host has no apt-get; labkit's provisioning installs on Debian and Ubuntu only." >&2
  echo "  Install by hand what is missing: python3 (3.9+), a static busybox, iproute2, util-linux, iptables or" >&2
  echo "  nftables, sudo, qemu-system, e2fsprogs, zstd, and a distro kernel in /boot for the VM baseline." >&2
  echo "  Going on with what is here: \`labkit doctor\` below says what works." >&2
fi
if [ ! -f "$repo/labkit/agent/server.py" ]; then
  echo "provision.sh: $repo is not a labkit checkout (no labkit/agent/server.py)." >&2
  exit 1
fi

case "$(uname -m)" in
  x86_64) qemu=qemu-system-x86 ;;
  aarch64|arm64) qemu=qemu-system-arm ;;
  *) qemu="" ; echo "provision.sh: $(uname -m) is not x86_64 or aarch64: the VM baseline will be unavailable" >&2 ;;
esac
# crun and runc: lab 07 times labkit's container start beside theirs; docker-registry: lab 06's registry.
pkgs=(python3 busybox-static iproute2 util-linux procps kmod psmisc iptables nftables sudo ca-certificates
      qemu-utils e2fsprogs zstd crun runc docker-registry $qemu)
[ "$jupyter" = 1 ] && pkgs+=(python3-venv python3-pip)

# The VM baseline (lab 07) boots a distro kernel from /boot: a host that has one keeps using it; otherwise the
# distribution's smallest VM kernel is installed (a kernel package installs fine in a container: only its
# files are needed, nothing boots it but qemu).
boot_kernel() { find /boot -maxdepth 1 -name 'vmlinuz-*' -size +1M -readable 2>/dev/null | head -n 1; }
kernel_pkg=""
if [ -z "$(boot_kernel)" ] && [ "$have_apt" = 1 ]; then
  os_id=$(. /etc/os-release 2>/dev/null && echo "${ID:-}")
  os_like=$(. /etc/os-release 2>/dev/null && echo "${ID_LIKE:-}")
  dpkg_arch=$(dpkg --print-architecture)
  if [ "$os_id" = ubuntu ] || [[ " $os_like " == *" ubuntu "* ]]; then
    kernel_pkg=linux-image-virtual
  elif [ "$os_id" = debian ] || [[ " $os_like " == *" debian "* ]]; then
    case "$dpkg_arch" in amd64|arm64) kernel_pkg=linux-image-cloud-$dpkg_arch ;; esac
  fi
  [ -n "$kernel_pkg" ] || echo "provision.sh: no known VM kernel package for $os_id/$dpkg_arch: lab 07 will say the VM is missing" >&2
fi

if [ "$have_apt" = 1 ]; then
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ] || [ -n "$kernel_pkg" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "provision.sh: installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ -n "$kernel_pkg" ]; then
    echo "provision.sh: /boot has no kernel for the VM baseline; installing $kernel_pkg"
    # its own step: a kernel that cannot be had costs lab 07 its VM columns, not the whole course
    apt-get install -y -qq --no-install-recommends "$kernel_pkg" >/dev/null \
      || echo "provision.sh: $kernel_pkg did not install: lab 07 will run without its VM and say why" >&2
  fi
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 9):
    sys.exit(f"provision.sh: python3 is {sys.version.split()[0]}; the labkit agent needs 3.9 or newer")
PY

if [ "$jupyter" = 1 ]; then
  user=${SUDO_USER:-vagrant}
  id "$user" >/dev/null 2>&1 || user=root
  venv=/opt/labkit-venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  want=$(sha256sum < "$repo/pyproject.toml" | cut -c1-16)
  if [ "$(cat "$venv/.labkit-deps" 2>/dev/null || true)" != "$want" ]; then
    echo "provision.sh: installing JupyterLab and labkit's dependencies into $venv"
    # dependencies only: labkit itself is imported from the synced checkout, so edits on the host show at once
    deps=$("$venv/bin/python" -c 'import tomllib,sys; print("\n".join(tomllib.load(open(sys.argv[1],"rb"))["project"]["dependencies"]))' "$repo/pyproject.toml")
    "$venv/bin/python" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q $deps
    echo "$want" > "$venv/.labkit-deps"
  fi
  # JupyterLab's token: random, made once, readable by root and $user only (whoever has it is $user in
  # this VM, and $user is root through sudo). jupyter reads it from the file (JUPYTER_TOKEN_FILE), so it is
  # in no unit file and no command line (`ps` shows those to every user).
  token_file=/etc/labkit/jupyter-token
  group=$(id -gn "$user")
  install -d -m 0755 /etc/labkit
  token=$(cat "$token_file" 2>/dev/null || true)
  if ! [[ "$token" =~ ^[A-Za-z0-9_-]{32,}$ ]]; then
    token=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    echo "provision.sh: made a new random token for JupyterLab in $token_file"
  fi
  tmp=$(mktemp /etc/labkit/.jupyter-token.XXXXXX)   # mode 0600 until it is the group's
  printf '%s' "$token" > "$tmp"                     # no newline: jupyter takes the file's text whole
  chown "root:$group" "$tmp"
  chmod 0640 "$tmp"
  mv -f "$tmp" "$token_file"
  # students work in the student editions (solutions removed), in their own folder: made once, and on a
  # later provision only the notebooks that are missing are added (a student's work is never overwritten)
  course=$(getent passwd "$user" | cut -d: -f6)/labkit-course
  runuser -u "$user" -- env PYTHONPATH="$repo" "$venv/bin/python" -m labkit.cli assign \
    --source "$repo/notebooks" --output "$course" --keep >/dev/null
  echo "provision.sh: the student editions are in $course (JupyterLab opens there)"
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    if install_unit labkit-jupyter.service <<UNIT
[Unit]
Description=JupyterLab for the labkit course (the notebook runs as $user; the agent under sudo)
After=network-online.target

[Service]
User=$user
Environment=PYTHONPATH=$repo
Environment=JUPYTER_TOKEN_FILE=$token_file
WorkingDirectory=$course
ExecStart=$venv/bin/jupyter lab --ip=0.0.0.0 --port=8888 --no-browser
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
    then
      systemctl enable labkit-jupyter.service >/dev/null
      systemctl restart labkit-jupyter.service  # a JupyterLab started with an older unit (a fixed token) stops
    else
      systemctl enable --now labkit-jupyter.service >/dev/null
    fi
    port=${LABKIT_JUPYTER_HOST_PORT:-8888}   # the laptop's end of the forwarded port (the Vagrantfile says)
    echo "provision.sh: JupyterLab runs here; on the laptop open http://127.0.0.1:$port/lab?token=$token"
    echo "  The token is in $token_file (root and $user only): \`vagrant ssh -c 'cat $token_file'\` on the laptop,"
    echo "  or labkit.client.vagrant.jupyter_url(). Keep it to yourself: whoever has it is $user here, and $user is root."
  fi
fi

# labkit's daemon as a service, as dockerd is (its own socket and Docker's Engine API under /run/labkit). Only
# the daemon is stopped with the service (KillMode=process): the containers' supervisor and the containers go
# on, as Docker's live-restore keeps them. Without systemd, `labkit daemon start` starts it in the background.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  install_unit labkitd.service <<UNIT || true
[Unit]
Description=labkit's daemon: labkit's engine behind /run/labkit/labkitd.sock and Docker's Engine API (docker.sock)
After=network-online.target

[Service]
Environment=PYTHONPATH=$repo
ExecStart=/usr/bin/python3 -m labkit.agent.daemon
KillMode=process
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
  systemctl enable labkitd.service >/dev/null 2>&1
  systemctl restart labkitd.service  # a daemon of an older checkout stops; its containers go on
  echo "provision.sh: labkit's daemon runs (systemctl status labkitd); the docker CLI can drive it:"
  echo "  DOCKER_HOST=unix:///run/labkit/docker.sock docker ps"
fi

# Lab 06's registry: Debian's docker-registry service, on 127.0.0.1:5000 only (its package listens on every
# address); lab.registry() finds it there and leaves it running.
if [ -f /etc/docker/registry/config.yml ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  sed -i -E 's/^([[:space:]]*addr:).*/\1 127.0.0.1:5000/' /etc/docker/registry/config.yml
  systemctl enable docker-registry.service >/dev/null 2>&1 || true
  systemctl restart docker-registry.service || true
fi

# A cluster across VMs (lab 09's option): the manager keeps the key; a worker lets that key run labkit's agent
# as root and nothing else (authorized_keys' forced command, restrict: no shell, no forwarding, no pty).
if [ -n "$cluster_key" ]; then
  install -d -m 0700 /etc/labkit/cluster
  install -m 0600 "$cluster_key" /etc/labkit/cluster/id_rsa
  rm -f "$cluster_key"
  touch /etc/labkit/cluster/known_hosts
  chmod 0600 /etc/labkit/cluster/known_hosts
  echo "provision.sh: this machine reaches its cluster's workers with /etc/labkit/cluster/id_rsa"
fi
if [ -n "$worker_key" ]; then
  pub=$(head -n 1 "$worker_key")
  if ! [[ "$pub" =~ ^ssh-(rsa|ed25519)\ [A-Za-z0-9+/=]+(\ [A-Za-z0-9@._-]*)?$ ]]; then
    echo "provision.sh: $worker_key holds no single SSH public key" >&2
    exit 2
  fi
  if ! [[ "$manager" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
    echo "provision.sh: --worker needs --manager=ADDRESS, the manager VM's address (the key is accepted from it only)" >&2
    exit 2
  fi
  if ! [[ "$repo" =~ ^/[A-Za-z0-9._/-]+$ ]]; then
    echo "provision.sh: a worker's labkit checkout must have a plain absolute path (it goes into a root command): $repo" >&2
    exit 2
  fi
  # the one command the cluster's key runs: root's own script (no arguments for sudo to match, no shell words)
  cat > /usr/local/sbin/labkit-node-agent.new <<AGENT
#!/bin/sh
# labkit: the cluster's manager reaches this worker's agent through this (provision.sh --worker)
cd / && exec /usr/bin/env PYTHONPATH=$repo /usr/bin/python3 -m labkit.agent
AGENT
  chmod 0755 /usr/local/sbin/labkit-node-agent.new
  mv -f /usr/local/sbin/labkit-node-agent.new /usr/local/sbin/labkit-node-agent
  id labkit-node >/dev/null 2>&1 || useradd --system --create-home --home-dir /var/lib/labkit-node \
    --shell /bin/sh --comment "labkit cluster node agent" labkit-node
  usermod -p '*' labkit-node  # no password, but not locked: sshd refuses a locked account even its key
  install -d -m 0700 -o labkit-node -g labkit-node /var/lib/labkit-node/.ssh
  printf 'restrict,from="%s",command="sudo -n /usr/local/sbin/labkit-node-agent" %s\n' "$manager" "$pub" \
    > /var/lib/labkit-node/.ssh/authorized_keys
  chown labkit-node:labkit-node /var/lib/labkit-node/.ssh/authorized_keys
  chmod 0600 /var/lib/labkit-node/.ssh/authorized_keys
  printf 'labkit-node ALL=(root) NOPASSWD: /usr/local/sbin/labkit-node-agent\n' > /etc/sudoers.d/labkit-node.tmp
  chmod 0440 /etc/sudoers.d/labkit-node.tmp
  visudo -cqf /etc/sudoers.d/labkit-node.tmp
  mv -f /etc/sudoers.d/labkit-node.tmp /etc/sudoers.d/labkit-node
  install -d -m 0755 /etc/labkit/cluster
  touch /etc/labkit/cluster/worker
  rm -f "$worker_key"
  echo "provision.sh: a cluster worker: the key of the manager at $manager may run labkit's agent here (and only that)"
fi

echo "provision.sh: self-test (labkit doctor)"
PYTHONPATH="$repo" python3 -m labkit.cli doctor --target local
