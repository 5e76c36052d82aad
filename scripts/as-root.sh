# Sourced by lab.sh, test.sh and setup.sh: run the calling script as root. A root shell goes straight on
# (no sudo needed, as on a fresh Debian machine or in a container); anyone else is asked for sudo once.
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo --preserve-env=CI,LABKIT_SKIP_VM,LABKIT_TARGET bash "$0" "$@"
  fi
  echo "labkit: $(basename "$0") installs Debian packages and creates kernel objects: run it as root" \
       "(su -c 'bash $0'), or install sudo." >&2
  exit 1
fi
