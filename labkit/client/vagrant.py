"""The lab VM from the client's side: find it with ``vagrant ssh-config`` and reach it over SSH.

``ssh_config()`` runs ``vagrant ssh-config`` in the project's ``vagrant/`` folder every time it is
asked (the port changes after ``vagrant up``/``reload``), keeps only the ``Key value`` lines of the
``Host`` block (Vagrant and its plugins print warnings on stdout too), and turns Vagrant's complaints
into errors that name the ``vagrant`` command to run. ``transport()`` opens the SSH transport with
``sudo -n`` and the agent from the synced checkout at /labkit, or ships the agent when there is none.

The VM's SSH host key is trusted on first use and checked on every later connect: the first key seen
is stored per VM in ``~/.config/labkit/known_hosts/<Vagrant machine id>`` (``host_key_store()``), and
a VM that shows another key is refused (:class:`labkit.client.transport.HostKeyChanged`, naming the file to
delete when the VM was re-keyed on purpose). ``vagrant ssh-config``'s ``StrictHostKeyChecking no`` and
``UserKnownHostsFile /dev/null`` are Vagrant's own settings for its ``ssh``; they are not read. A VM
made anew (``vagrant destroy``, ``vagrant up``) has a new machine id, so its key is stored afresh.

``jupyter_url()`` reads the token of the JupyterLab inside the VM (made at random by provision.sh) over
the same checked SSH connection. Standard library only (paramiko is loaded by the SSH transport).
"""
import hashlib
import os
import re
import shlex
import subprocess

from ..wire.errors import TransportError

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    """{'Host' (the machine's name), 'HostName', 'User', 'Port', 'IdentityFile'} from ``vagrant ssh-config``
    output, noise ignored. Its host key settings (``StrictHostKeyChecking``, ``UserKnownHostsFile``) are
    not taken: labkit checks the VM's key itself."""
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
            out["Host"] = value.strip('"')
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


def lab_machine(directory=None):
    """The lab VM's machine name when ``directory`` made a cluster of VMs (``LABKIT_VM_NODES=3``: "manager",
    beside its workers), else None (the one machine, "default")."""
    dot = os.environ.get("VAGRANT_DOTFILE_PATH") or ".vagrant"
    return "manager" if os.path.isdir(os.path.join(_project_dir(directory), dot, "machines", "manager")) else None


def ssh_config(directory=None, vagrant_cmd=("vagrant",), timeout=120):
    directory = directory or vagrant_dir()
    # the lab VM by name when there are several (a worker that is down must not stop the lab VM's connection)
    argv = list(vagrant_cmd) + ["ssh-config"] + [m for m in [lab_machine(directory)] if m]
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


def _project_dir(directory):
    """The folder whose Vagrantfile Vagrant uses: ``$VAGRANT_CWD`` when set, else ``directory``."""
    return os.path.abspath(os.environ.get("VAGRANT_CWD") or directory or vagrant_dir())


def machine_id(directory=None, machine="default"):
    """The provider's id of the VM ``machine`` made from ``directory`` (``.vagrant/machines/<machine>/
    <provider>/id``, or under ``$VAGRANT_DOTFILE_PATH``), or None. It changes when the VM is made anew."""
    project = _project_dir(directory)
    dot = os.environ.get("VAGRANT_DOTFILE_PATH") or ".vagrant"
    base = os.path.join(project, dot, "machines", machine)
    found = []
    try:
        providers = os.listdir(base)
    except OSError:
        return None
    for provider in providers:
        path = os.path.join(base, provider, "id")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                value = f.read().strip()
        except OSError:
            continue
        if value:
            found.append((os.path.getmtime(path), value))
    return max(found)[1] if found else None  # an old provider's folder may remain: the newest id is the VM


def host_key_store(directory=None, machine="default"):
    """``(path, label)``: the file that holds the VM's SSH host key once it was first seen, and how
    messages name the VM. The file is ``~/.config/labkit/known_hosts/<machine id>`` (the id as Vagrant
    keeps it, hashed when it is not a plain name; the folder and machine name when no id is found)."""
    from .transport import config_dir
    project = _project_dir(directory)
    ident = machine_id(directory, machine)
    if ident and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", ident):
        name = ident
    elif ident:
        name = "id-" + hashlib.sha256(ident.encode()).hexdigest()[:24]
    else:
        name = "dir-" + hashlib.sha256(f"{project}\0{machine}".encode()).hexdigest()[:24]
    label = f"the lab VM '{machine}' of {project}" + (f" (Vagrant id {ident})" if ident else "")
    return os.path.join(config_dir(), "known_hosts", name), label


def _vagrant_cmd(vagrant_cmd, netns):
    if vagrant_cmd is None:
        vagrant_cmd = ("ip", "netns", "exec", netns, "vagrant") if netns else ("vagrant",)
    return vagrant_cmd


def _ssh_options(directory, vagrant_cmd, netns):
    """The SSH transport's options for the VM: address, user, key, and its host key checked per VM."""
    cfg = ssh_config(directory, vagrant_cmd)
    store, label = host_key_store(directory, cfg.get("Host") or "default")
    return {"host": cfg["HostName"], "port": int(cfg.get("Port", 22)), "user": cfg.get("User", "vagrant"),
            "key_filename": cfg.get("IdentityFile"), "netns": netns, "trust_on_first_use": store,
            "trust_label": label}


def transport(directory=None, vagrant_cmd=None, netns=None, **options):
    """An SSH transport to the lab VM (the agent under ``sudo -n``, from the synced checkout if present).

    ``netns`` (default ``$LABKIT_VAGRANT_NETNS``): a network namespace that the VM's network lives in
    (the CI tier keeps libvirt there); ``vagrant`` then runs, and the SSH connection is made, inside it.
    The VM's host key is trusted on first use and checked ever after (see the module's docstring);
    ``known_hosts`` or ``host_key`` options add keys trusted besides the stored one.
    """
    from .transport import SSH
    netns = netns or os.environ.get("LABKIT_VAGRANT_NETNS") or None
    ssh = _ssh_options(directory, _vagrant_cmd(vagrant_cmd, netns), netns)
    ssh.update(options)
    return SSH(ssh.pop("host"), sudo=None, remote_checkout=SYNCED_CHECKOUT, **ssh)


JUPYTER_TOKEN_FILE = "/etc/labkit/jupyter-token"  # made by provision.sh --jupyter: root and the vagrant user
JUPYTER_GUEST_PORT = 8888


def jupyter_url(lab=None, directory=None, vagrant_cmd=None, netns=None, token_file=JUPYTER_TOKEN_FILE, **options):
    """The address of the JupyterLab inside the lab VM, with its token: ``http://127.0.0.1:PORT/lab?token=...``.

    The token is read from the VM (``/etc/labkit/jupyter-token``, readable by root and the vagrant user)
    over the SSH connection of ``lab`` (from ``labkit.connect("vagrant")``), or over a new one whose host
    key is checked as ``transport()`` checks it. PORT is the laptop's end of the forwarded port
    (``vagrant port --guest 8888``). Anyone with this address is the vagrant user in the VM, and so root
    there: keep it to yourself."""
    from .transport import SSH, ssh_client, ssh_exec
    netns = netns or os.environ.get("LABKIT_VAGRANT_NETNS") or None
    cmd = _vagrant_cmd(vagrant_cmd, netns)
    t = getattr(lab, "transport", lab)
    read = f"cat -- {shlex.quote(token_file)}"
    fix = ("JupyterLab runs in the VM when it was provisioned with it: unset LABKIT_VM_JUPYTER (or set it to a "
           f"port), then `cd {directory or vagrant_dir()} && vagrant provision`")
    if isinstance(t, SSH):
        token = ssh_exec(t.client, read, fix=fix, where="the lab VM")
    else:
        ssh = _ssh_options(directory, cmd, netns)
        ssh.update(options)
        client, _ = ssh_client(ssh.pop("host"), **ssh)
        try:
            token = ssh_exec(client, read, fix=fix, where="the lab VM")
        finally:
            client.close()
    token = token.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,}", token):
        raise TransportError(f"{token_file} in the lab VM does not hold a token", fix=fix)
    configured = os.environ.get("LABKIT_VM_JUPYTER", "")
    port = configured if configured.isdigit() else str(JUPYTER_GUEST_PORT)
    try:
        res = subprocess.run(list(cmd) + ["port", "--guest", str(JUPYTER_GUEST_PORT)], cwd=directory or vagrant_dir(),
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        said = res.stdout.strip().splitlines()
        if res.returncode == 0 and said and said[-1].strip().isdigit():
            port = said[-1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass  # the configured port, then
    return f"http://127.0.0.1:{port}/lab?token={token}"
