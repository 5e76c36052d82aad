"""The lab VM from the client's side: find it with ``vagrant ssh-config`` and reach it over SSH.

``ssh_config()`` runs ``vagrant ssh-config`` in the project's ``vagrant/`` folder every time it is
asked (the port changes after ``vagrant up``/``reload``), keeps only the ``Key value`` lines of the
``Host`` block (Vagrant and its plugins print warnings on stdout too), and turns Vagrant's complaints
into errors that name the ``vagrant`` command to run. ``transport()`` opens the SSH transport with
``sudo -n`` and the agent from the synced checkout at /labkit, or ships the agent when there is none.
Standard library only (paramiko is loaded by the SSH transport).
"""
import os
import re
import subprocess

from .errors import TransportError

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNCED_CHECKOUT = "/labkit"
_KEYS = {"hostname": "HostName", "user": "User", "port": "Port", "identityfile": "IdentityFile"}


def vagrant_dir():
    return os.environ.get("LABKIT_VAGRANT_DIR") or os.path.join(REPO_DIR, "vagrant")


def is_configured(directory=None):
    """True when a lab VM has been created from ``directory`` (``vagrant up`` ran there at least once)."""
    machines = os.path.join(directory or vagrant_dir(), ".vagrant", "machines")
    if not os.path.isdir(machines):
        return False
    for root, _, files in os.walk(machines):
        if "id" in files:
            return True
    return False


def parse_ssh_config(text):
    """{'HostName', 'User', 'Port', 'IdentityFile'} from ``vagrant ssh-config`` output, noise ignored."""
    out, in_host = {}, False
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z]+)\s+(.+?)\s*$", line)
        if not m:
            continue
        key, value = m.group(1), m.group(2)
        if key == "Host":
            if in_host:
                break  # only the first machine
            in_host = True
            continue
        if in_host and key.lower() in _KEYS and _KEYS[key.lower()] not in out:
            out[_KEYS[key.lower()]] = value.strip('"')
    return out


_HINTS = [
    (r"not yet ready for SSH|is not running|poweroff|shutoff|halted|must be running|not created",
     "start the lab VM: `cd {dir} && vagrant up`"),
    (r"saved|suspended", "resume the lab VM: `cd {dir} && vagrant resume`"),
    (r"A Vagrant environment or target machine is required|Vagrantfile",
     "run it from labkit's vagrant folder, or set LABKIT_VAGRANT_DIR to the folder with the Vagrantfile"),
]


def ssh_config(directory=None, vagrant_cmd=("vagrant",), timeout=120):
    directory = directory or vagrant_dir()
    argv = list(vagrant_cmd) + ["ssh-config"]
    try:
        res = subprocess.run(argv, cwd=directory, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise TransportError("the 'vagrant' command is not installed on this machine",
                             fix="install Vagrant and a provider (see README.md, 'The lab VM'), then "
                                 f"`cd {directory} && vagrant up`") from None
    except subprocess.TimeoutExpired:
        raise TransportError(f"`{' '.join(argv)}` did not answer within {timeout} s",
                             fix=f"check the VM with `cd {directory} && vagrant status`") from None
    cfg = parse_ssh_config(res.stdout)
    if res.returncode != 0 or "HostName" not in cfg:
        said = (res.stderr or res.stdout).strip()
        fix = f"check the VM with `cd {directory} && vagrant status`, then `vagrant up`"
        for pattern, hint in _HINTS:
            if re.search(pattern, said, re.I):
                fix = hint.format(dir=directory)
                break
        raise TransportError(f"the lab VM is not reachable: `{' '.join(argv)}` said: {said[-400:] or 'nothing'}",
                             fix=fix)
    return cfg


def transport(directory=None, vagrant_cmd=None, netns=None, **options):
    """An SSH transport to the lab VM (the agent under ``sudo -n``, from the synced checkout if present).

    ``netns`` (default ``$LABKIT_VAGRANT_NETNS``): a network namespace that the VM's network lives in
    (the CI tier keeps libvirt there); ``vagrant`` then runs, and the SSH connection is made, inside it.
    """
    from .transport import SSH
    netns = netns or os.environ.get("LABKIT_VAGRANT_NETNS") or None
    if vagrant_cmd is None:
        vagrant_cmd = ("ip", "netns", "exec", netns, "vagrant") if netns else ("vagrant",)
    cfg = ssh_config(directory, vagrant_cmd)
    return SSH(cfg["HostName"], port=int(cfg.get("Port", 22)), user=cfg.get("User", "vagrant"),
               key_filename=cfg.get("IdentityFile"), sudo=None, remote_checkout=SYNCED_CHECKOUT,
               netns=netns, **options)
