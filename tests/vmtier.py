"""The real `vagrant up` tier: a pure cgroup v2 Debian 12 guest, booted from vagrant/Vagrantfile.

No Vagrant box can be downloaded here, so this module builds one (debootstrap, no loop devices and
no bootloader: `mkfs.ext4 -d`, the kernel and initrd booted directly by libvirt) and caches it. It then
runs libvirtd, its networks and `vagrant` inside a network namespace of its own (``labkit-vmtier-net``), with
/dev/kvm hidden from libvirtd (nested KVM hangs here; the guest runs under TCG), and runs
`vagrant up --provider=libvirt` exactly as a student would: the guest is provisioned by
vagrant/provision.sh. Everything it starts it stops, by pid, and everything it defines it undefines.

Measured facts behind the choices: ../shared/notes/vagrant-in-ci.md.

Use from tests: the ``vm_lab`` fixture (conftest.py). By hand:
    sudo .venv/bin/python tests/vmtier.py up [3]   # build/cache the box, start libvirt, vagrant up (3: a
                                                   # manager and two workers, LABKIT_VM_NODES=3)
    sudo .venv/bin/python tests/vmtier.py down [DOTFILE [3]]  # vagrant destroy, stop libvirt, remove the namespace
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("LABKIT_VMTIER_CACHE", "/var/cache/labkit-vmtier")
NETNS = "labkit-vmtier-net"  # not "lk-*": that is what `labkit cleanup` removes, and the tests run it
POOL = "labkit-vmtier"
BOX_NAME = "labkit/debian12-local"
STATE = "/run/labkit-vmtier"            # pids and the private config of the tier's daemons
LOG = os.path.join(CACHE, "vmtier.log")

# Everything provision.sh installs is already in the box: the guest's network has no way out.
BOX_PACKAGES = [
    "systemd-sysv", "openssh-server", "sudo", "python3", "rsync", "linux-image-cloud-amd64",
    "initramfs-tools", "ifupdown", "isc-dhcp-client", "iproute2", "udev", "dbus", "kmod", "netbase",
    "busybox-static", "util-linux", "procps", "psmisc", "iptables", "nftables", "ca-certificates",
    "qemu-utils", "qemu-system-x86", "e2fsprogs", "zstd", "crun", "runc", "docker-registry",
]
VAGRANT_PUB = None  # read from the installed Vagrant at build time
QEMU_CONF = """# labkit VM tier: libvirtd's qemu.conf, bind-mounted over /etc/libvirt/qemu.conf in its own mount namespace
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
namespaces = [ ]
stdio_handler = "file"
"""


def log(msg):
    os.makedirs(CACHE, exist_ok=True)
    line = time.strftime("%H:%M:%S ") + msg
    with open(LOG, "a") as f:
        f.write(line + "\n")
    print("[vmtier] " + msg, file=sys.stderr, flush=True)


def sh(argv, check=True, timeout=1200, env=None, capture=True, **kw):
    full_env = dict(os.environ)
    full_env.update(env or {})
    res = subprocess.run(argv, capture_output=capture, text=True, timeout=timeout, env=full_env,
                         stdin=subprocess.DEVNULL, **kw)
    if capture:
        os.makedirs(CACHE, exist_ok=True)
        with open(LOG, "a") as f:
            f.write(f"$ {' '.join(argv)}\n{res.stdout[-4000:]}{res.stderr[-4000:]}\n")
    if check and res.returncode != 0:
        tail = ((res.stderr or "") + (res.stdout or ""))[-1500:] if capture else ""
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}:\n{tail}")
    return res


# --- the box -------------------------------------------------------------------------------------

def debian_mirror():
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        try:
            for line in open(path):
                line = line.strip()
                if line.startswith("URIs:") and "security" not in line:
                    return line.split()[1]
                if line.startswith("deb ") and "security" not in line:
                    return line.split()[1] if not line.split()[1].startswith("[") else line.split()[2]
        except OSError:
            continue
    return "http://deb.debian.org/debian"


def box_recipe_hash():
    with open(os.path.abspath(__file__), "rb") as f:
        src = f.read()
    # the recipe is this module's box section; any edit rebuilds (cheap to reason about, ~2 min)
    start, end = src.index(b"# --- the box"), src.index(b"# --- libvirt")
    return hashlib.sha256(src[start:end] + json.dumps(BOX_PACKAGES).encode()).hexdigest()[:16]


def vagrant_insecure_key():
    out = sh(["gem", "contents", "vagrant"], check=False).stdout if shutil.which("gem") else ""
    for p in out.split() + ["/usr/share/rubygems-integration/all/gems/vagrant-2.3.4/keys/vagrant.pub"]:
        if p.endswith("keys/vagrant.pub") and os.path.exists(p):
            return open(p).read().strip()
    import glob
    for p in glob.glob("/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub"):
        return open(p).read().strip()
    raise RuntimeError("Vagrant's insecure public key was not found: is the vagrant package installed?")


def build_box():
    """Build (or reuse) the Debian 12 libvirt box and add it to VAGRANT_HOME; returns the .box path."""
    os.makedirs(CACHE, exist_ok=True)
    os.chmod(CACHE, 0o755)
    key = box_recipe_hash()
    box = os.path.join(CACHE, f"debian12-{key}.box")
    if os.path.exists(box):
        log(f"box cached: {box}")
        return box
    for old in os.listdir(CACHE):
        if old.startswith("debian12-") and old.endswith(".box"):
            os.unlink(os.path.join(CACHE, old))
    work = tempfile.mkdtemp(prefix="box-", dir=CACHE)
    root = os.path.join(work, "rootfs")
    started = time.monotonic()
    try:
        log("debootstrap Debian 12 (about 2 minutes)")
        sh(["debootstrap", "--variant=minbase", "--include=" + ",".join(BOX_PACKAGES), "bookworm", root,
            debian_mirror()], timeout=1800)
        pub = vagrant_insecure_key()
        script = f"""set -e
useradd -m -s /bin/bash vagrant
echo vagrant:vagrant | chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/vagrant
chmod 440 /etc/sudoers.d/vagrant
install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh
echo '{pub}' > /home/vagrant/.ssh/authorized_keys
chown vagrant:vagrant /home/vagrant/.ssh/authorized_keys
chmod 600 /home/vagrant/.ssh/authorized_keys
echo 'UseDNS no' > /etc/ssh/sshd_config.d/vagrant.conf
echo labkit-box > /etc/hostname
printf '127.0.0.1 localhost\\n127.0.1.1 labkit-box\\n' > /etc/hosts
echo '/dev/vda / ext4 defaults 0 1' > /etc/fstab
printf 'auto lo\\niface lo inet loopback\\n\\nauto eth0\\niface eth0 inet dhcp\\n' > /etc/network/interfaces
rm -f /etc/ssh/ssh_host_*
mkdir -p /etc/systemd/system/ssh.service.d
printf '[Service]\\nExecStartPre=\\nExecStartPre=/usr/bin/ssh-keygen -A\\nExecStartPre=/usr/sbin/sshd -t\\n' > /etc/systemd/system/ssh.service.d/hostkeys.conf
apt-get clean
rm -rf /var/lib/apt/lists/*
"""
        sh(["chroot", root, "/bin/sh", "-c", script])
        boot = os.path.join(root, "boot")
        kernel = sorted(f for f in os.listdir(boot) if f.startswith("vmlinuz-"))[-1]
        initrd = "initrd.img-" + kernel[len("vmlinuz-"):]
        shutil.copy(os.path.join(boot, kernel), os.path.join(work, "vmlinuz"))
        shutil.copy(os.path.join(boot, initrd), os.path.join(work, "initrd.img"))
        log("mkfs.ext4 -d and qemu-img convert")
        raw = os.path.join(work, "disk.raw")
        sh(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", root, raw, "6G"])
        shutil.rmtree(root)
        sh(["qemu-img", "convert", "-c", "-O", "qcow2", raw, os.path.join(work, "box.img")])
        os.unlink(raw)
        with open(os.path.join(work, "metadata.json"), "w") as f:
            json.dump({"provider": "libvirt", "format": "qcow2", "virtual_size": 6}, f)
        with open(os.path.join(work, "Vagrantfile"), "w") as f:
            f.write('# labkit CI box: Debian 12, the kernel and initrd booted directly (no bootloader)\n'
                    'Vagrant.configure("2") do |config|\n'
                    '  config.vm.provider :libvirt do |lv|\n'
                    '    lv.kernel = File.join(File.dirname(__FILE__), "vmlinuz")\n'
                    '    lv.initrd = File.join(File.dirname(__FILE__), "initrd.img")\n'
                    '    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0"\n'
                    '  end\n'
                    'end\n')
        tmp = box + ".tmp"
        sh(["tar", "-C", work, "-cf", tmp, "metadata.json", "Vagrantfile", "box.img", "vmlinuz", "initrd.img"])
        os.replace(tmp, box)
        log(f"box built in {time.monotonic() - started:.0f} s: {box} ({os.path.getsize(box) >> 20} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return box


# --- libvirt in a network namespace of its own ---------------------------------------------------

def vagrant_env(dotfile, nodes=1):
    return {"LABKIT_VM_NODES": str(nodes), "LABKIT_VM_WORKER_MEMORY": "768",
            "VAGRANT_HOME": os.path.join(CACHE, "vagrant.d"), "VAGRANT_DOTFILE_PATH": dotfile,
            "VAGRANT_CWD": os.path.join(REPO, "vagrant"), "VAGRANT_DEFAULT_PROVIDER": "libvirt",
            "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_NO_COLOR": "1",
            "LABKIT_VM_BOX": BOX_NAME, "LABKIT_VM_LIBVIRT_DRIVER": "qemu", "LABKIT_VM_LIBVIRT_POOL": POOL,
            "LABKIT_VM_JUPYTER": "off", "LABKIT_VM_BOOT_TIMEOUT": "900",
            "LIBVIRT_DEFAULT_URI": "qemu:///system"}


def in_ns(argv):
    return ["ip", "netns", "exec", NETNS] + argv


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop_pid(pid, name):
    if not pid or not _pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    log(f"{name} ({pid}) ignored SIGTERM; killing it")
    os.kill(pid, signal.SIGKILL)


class Tier:
    """The VM tier's lifetime: ``with Tier() as t:`` ... ``t.lab()`` ... (everything undone on exit)."""

    def __init__(self, nodes=1):
        self.nodes = nodes  # 1: the lab VM; 3: the manager and two workers of lab 09's cluster of VMs
        self.dotfile = None
        self.pids = {}
        self.up_seconds = None

    # -- daemons ---------------------------------------------------------------------------------
    def start_libvirt(self):
        os.makedirs(STATE, exist_ok=True)
        if os.path.exists(f"/run/netns/{NETNS}"):
            raise RuntimeError(f"network namespace {NETNS} already exists: run `tests/vmtier.py down` first")
        sh(["ip", "netns", "add", NETNS])
        sh(["ip", "-n", NETNS, "link", "set", "lo", "up"])
        if not os.path.exists("/run/dbus/system_bus_socket"):
            os.makedirs("/run/dbus", exist_ok=True)
            out = sh(["dbus-daemon", "--system", "--fork", "--print-pid"]).stdout.split()
            self.pids["dbus"] = int(out[0])
            with open(os.path.join(STATE, "dbus.pid"), "w") as f:
                f.write(out[0])
        conf = os.path.join(STATE, "qemu.conf")
        with open(conf, "w") as f:
            f.write(QEMU_CONF)
        nokvm = os.path.join(STATE, "no-kvm")
        open(nokvm, "w").close()
        os.chmod(nokvm, 0)
        pidfile = os.path.join(STATE, "libvirtd.pid")
        # libvirtd in the tier's network namespace and in a private mount namespace of its own,
        # where /dev/kvm is an empty file and qemu.conf is ours: the host keeps both as they are.
        inner = (f"mount --bind {nokvm} /dev/kvm 2>/dev/null || true; "
                 f"mount --bind {conf} /etc/libvirt/qemu.conf && exec libvirtd --daemon --pid-file {pidfile}")
        sh(in_ns(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]))
        for _ in range(200):
            if os.path.exists(pidfile) and os.path.exists("/run/libvirt/libvirt-sock"):
                break
            time.sleep(0.05)
        self.pids["libvirtd"] = int(open(pidfile).read().strip())
        sh(["virsh", "-c", "qemu:///system", "version"])
        pool_dir = os.path.join(CACHE, "pool")
        os.makedirs(pool_dir, exist_ok=True)
        # a run killed before its teardown (a stopped CI job) leaves the pool's definition in
        # /etc/libvirt/storage: it is ours by its exact name, so it goes before we define it again
        if sh(["virsh", "pool-info", POOL], check=False).returncode == 0:
            log(f"pool {POOL} left by an earlier run: removing it")
            sh(["virsh", "pool-destroy", POOL], check=False)
            sh(["virsh", "pool-undefine", POOL])
        # and so do the domains of a run stopped while `vagrant up` made them (vagrant then says their names are
        # "already taken"): vagrant-libvirt names them <Vagrantfile's folder>_<machine>, ours by that exact name
        for name in ["manager"] + [f"worker{i}" for i in range(1, self.nodes)]:
            if sh(["virsh", "dominfo", f"vagrant_{name}"], check=False).returncode == 0:
                log(f"domain vagrant_{name} left by an earlier run: removing it")
                sh(["virsh", "destroy", f"vagrant_{name}"], check=False)
                sh(["virsh", "undefine", f"vagrant_{name}", "--nvram"], check=False)
        sh(["virsh", "pool-define-as", POOL, "dir", "--target", pool_dir])
        sh(["virsh", "pool-start", POOL])
        log(f"libvirtd {self.pids['libvirtd']} runs in netns {NETNS}; pool {POOL} at {pool_dir}")

    # -- vagrant ---------------------------------------------------------------------------------
    def vagrant(self, *args, timeout=1800):
        return sh(in_ns(["vagrant", *args]), env=vagrant_env(self.dotfile, self.nodes), timeout=timeout)

    def up(self):
        box = build_box()
        env = vagrant_env("/nonexistent")
        sh(["vagrant", "box", "add", "--force", "--name", BOX_NAME, box], env=env)
        os.chmod(CACHE, 0o755)
        self.dotfile = tempfile.mkdtemp(prefix="labkit-vagrant-dot-")
        self.start_libvirt()
        start = time.monotonic()
        log(f"vagrant up --provider=libvirt: {self.nodes} machine(s) (about 2.5 minutes each under TCG)")
        self.vagrant("up", "--provider=libvirt")
        self.up_seconds = time.monotonic() - start
        log(f"vagrant up took {self.up_seconds:.0f} s")
        os.environ.update({k: v for k, v in vagrant_env(self.dotfile, self.nodes).items()
                           if k.startswith("VAGRANT_") or k == "LABKIT_VM_NODES"})
        os.environ["LABKIT_VAGRANT_NETNS"] = NETNS
        # the VM's host key is trusted on first use and stored per machine id: keep that store with the tier
        self.saved_xdg = os.environ.get("XDG_CONFIG_HOME")
        os.environ["XDG_CONFIG_HOME"] = os.path.join(STATE, "config")
        return self

    def lab(self):
        import labkit
        return labkit.connect("vagrant")

    def lab_machine(self):
        """The lab VM's name for vagrant's commands: [] for the one VM, ["manager"] beside workers."""
        return ["manager"] if self.nodes > 1 else []

    # -- teardown --------------------------------------------------------------------------------
    def down(self):
        errors = []

        def attempt(what, fn):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - undo everything we can, then report
                errors.append(f"{what}: {exc}")

        if self.dotfile and os.path.exists(f"/run/netns/{NETNS}"):
            attempt("vagrant destroy", lambda: self.vagrant("destroy", "-f", timeout=300))
        if os.path.exists("/run/libvirt/libvirt-sock"):
            virsh = ["virsh", "-c", "qemu:///system"]
            for dom in sh(virsh + ["list", "--all", "--name"], check=False).stdout.split():
                if dom.startswith("vagrant_") or dom.startswith("labkit"):
                    sh(virsh + ["destroy", dom], check=False)
                    sh(virsh + ["undefine", dom, "--nvram"], check=False)
            for net in ("vagrant-libvirt", "labkit-cluster"):
                sh(virsh + ["net-destroy", net], check=False)
                sh(virsh + ["net-undefine", net], check=False)
            for vol in sh(virsh + ["vol-list", POOL, "--details"], check=False).stdout.splitlines()[2:]:
                if vol.split():
                    sh(virsh + ["vol-delete", "--pool", POOL, vol.split()[0]], check=False)
            sh(virsh + ["pool-destroy", POOL], check=False)
            sh(virsh + ["pool-undefine", POOL], check=False)
        for name in ("libvirtd", "dbus"):  # pids recorded by an earlier process (`vmtier.py up`)
            pidfile = os.path.join(STATE, f"{name}.pid")
            if name not in self.pids and os.path.exists(pidfile):
                self.pids[name] = int(open(pidfile).read().strip() or 0)
        attempt("stop libvirtd", lambda: _stop_pid(self.pids.get("libvirtd"), "libvirtd"))
        attempt("stop dbus", lambda: _stop_pid(self.pids.get("dbus"), "dbus-daemon"))
        # whatever libvirt started in the namespace (dnsmasq, qemu) goes with it
        if os.path.exists(f"/run/netns/{NETNS}"):
            for pid in sh(["ip", "netns", "pids", NETNS], check=False).stdout.split():
                attempt(f"kill {pid}", lambda p=int(pid): os.kill(p, signal.SIGKILL))
            time.sleep(0.2)
            attempt("ip netns delete", lambda: sh(["ip", "netns", "delete", NETNS]))
        if self.dotfile:
            shutil.rmtree(self.dotfile, ignore_errors=True)
        shutil.rmtree(STATE, ignore_errors=True)
        for k in ("VAGRANT_HOME", "VAGRANT_DOTFILE_PATH", "VAGRANT_CWD", "LABKIT_VAGRANT_NETNS", "LABKIT_VM_NODES",
                  "VAGRANT_DEFAULT_PROVIDER", "VAGRANT_CHECKPOINT_DISABLE", "VAGRANT_NO_COLOR"):
            os.environ.pop(k, None)
        if getattr(self, "saved_xdg", None) is not None:
            os.environ["XDG_CONFIG_HOME"] = self.saved_xdg
        elif hasattr(self, "saved_xdg"):
            os.environ.pop("XDG_CONFIG_HOME", None)
        if errors:
            raise RuntimeError("VM tier teardown left work undone: " + "; ".join(errors))

    def __enter__(self):
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc):
        self.down()


def leftovers():
    """What the tier may leave: qemu/libvirt processes, its namespace, domains (empty when clean)."""
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                comm = open(f"/proc/{p}/comm").read().strip()
            except OSError:
                continue
            if comm.startswith("qemu-system") or comm in ("libvirtd", "virtlogd", "dnsmasq") or \
                    (comm == "dbus-daemon" and os.path.exists(os.path.join(STATE, "dbus.pid"))):
                found.append(f"process {p} {comm}")
    if os.path.exists(f"/run/netns/{NETNS}"):
        found.append(f"netns {NETNS}")
    import glob
    for pattern in ("/etc/libvirt/qemu/vagrant_*.xml", "/etc/libvirt/qemu/networks/vagrant-libvirt.xml",
                    "/etc/libvirt/qemu/networks/labkit-cluster.xml",
                    f"/etc/libvirt/storage/{POOL}.xml", "/run/libvirt/qemu/*.pid"):
        found += [f"libvirt definition {p}" for p in glob.glob(pattern)]
    for line in (sh(["iptables", "-S"], check=False).stdout if shutil.which("iptables") else "").splitlines():
        if line.startswith("-N LIBVIRT_"):
            found.append(f"iptables chain {line.split()[1]} on the host")
    for line in open("/proc/self/mounts"):
        if "/dev/kvm" in line.split()[1:2] or "qemu.conf" in line:
            found.append(f"mount {line.split()[1]}")
    return found


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "status"
    if cmd == "box":
        print(build_box())
    elif cmd == "up":
        t = Tier(nodes=int(sys.argv[2]) if len(sys.argv) > 2 else 1).up()
        print(json.dumps({"dotfile": t.dotfile, "up_seconds": t.up_seconds}))
    elif cmd == "down":  # down [DOTFILE [NODES]]
        t = Tier(nodes=int(sys.argv[3]) if len(sys.argv) > 3 else 1)
        t.dotfile = sys.argv[2] if len(sys.argv) > 2 else None
        t.down()
    else:
        print("\n".join(leftovers()) or "clean")
