"""The checks behind the notebooks' exercises. Each inspects the live state on the target.

A check is ``fn(lab, answer) -> (fraction or bool, feedback)``; :class:`labkit.course.grading.Checker`
turns it into points. Checks trust nothing the answer claims: they ask the target (files in the
rootfs, /proc/<pid>/ns/*, /proc/<pid>/status, uid_map, nsenter) and compare.
"""
import re

from ..client.handles import Cgroup, Container, OverlayRoot, Process, Rootfs, VirtualMachine
from ..wire.errors import LabkitError, NotFound
from .grade import Unverifiable


def _spec_of(record):
    """The spec a run_in record carries (None for anything else)."""
    return record.get("spec") if hasattr(record, "get") else None


def _host_ns(lab):
    return lab.host_namespaces()


# -- 00-setup ------------------------------------------------------------------------------------

def kernel_release(lab, answer):
    truth = lab.read_file("/proc/sys/kernel/osrelease")["text"].strip()
    if str(answer).strip() == truth:
        return True, f"right: the target runs Linux {truth}. Every container you start there shares this kernel."
    return False, f"the target's kernel is not {answer!r}; ask the target (lab.run(['uname', '-r']))"


def cgroup_mode(lab, answer):
    truth = lab.doctor()["cgroups"]["value"]
    if str(answer).strip().lower() == truth:
        return True, f"right: cgroups here are {truth}. Lab 03 shows what that changes."
    return False, f"the target's cgroup mode is not {answer!r}; read it from lab.doctor()"


# -- 01-chroot -----------------------------------------------------------------------------------

def rootfs_built(lab, rootfs):
    if not isinstance(rootfs, Rootfs):
        return False, "expected the handle that lab.rootfs(...) returns"
    top = lab.list_dir(rootfs.path)
    if not top["exists"]:
        return False, f"{rootfs.path} does not exist on the target"
    sh = lab.list_dir(rootfs.path + "/bin")["entries"]
    missing = [x for x in ("busybox", "sh", "ls") if x not in sh]
    if missing:
        return 0.5, f"{rootfs.path}/bin lacks {', '.join(missing)}"
    return True, f"{rootfs.path} holds a whole tiny system: {len(sh)} programs in /bin, all one static busybox."


def hello_in_chroot(lab, rootfs, record):
    if not isinstance(rootfs, Rootfs):
        return False, "build the rootfs first (exercise 1)"
    f = lab.read_file(rootfs.path + "/hello.txt")
    if not f["exists"]:
        return False, (f"there is no {rootfs.path}/hello.txt on the host: inside the chroot, '/hello.txt' is "
                       "that file. Run sh -c 'echo hello from chroot > /hello.txt' with lab.chroot")
    if "hello from chroot" not in f["text"]:
        return 0.5, f"hello.txt exists but holds {f['text'][:60]!r}, not 'hello from chroot'"
    steps = [s for s in (getattr(record, "steps", None) or []) if s.get("call") == "chroot"]
    if not steps:
        return 0.5, "the file is there, but your record shows no chroot(2) call: did you write it from the host?"
    return True, (f"the process wrote '/hello.txt' and the host finds it at {rootfs.path}/hello.txt: chroot only "
                  "changes where '/' starts.")


def pivot_root_holds(lab, record):
    view = getattr(record, "facts", {}).get("view") or {}
    spec = _spec_of(record) or {}
    if spec.get("action") != "escape":
        return False, "run the escape attempt (lab.escape(..., pivot_root=True))"
    if spec.get("root_mode") != "pivot_root" or "mnt" not in spec.get("namespaces", []):
        return 0.3, "that attempt ran under plain chroot, where the escape works; use pivot_root=True"
    calls = [s.get("call") for s in record.steps]
    if "pivot_root" not in calls or "umount2" not in calls:
        return 0.3, "the record shows no pivot_root/umount2: the old root was never detached"
    if view.get("escaped") or view.get("host_files_visible"):
        return False, "the process still reached the host's files: the old root is reachable"
    return True, ("after pivot_root and detaching the old root, '..' at the top of the mount namespace leads "
                  "nowhere: the same escape that worked under chroot finds only the container's files.")


# -- 02-namespaces -------------------------------------------------------------------------------

def _from_the_kernel(value):
    """A value the grader could not take over from the student's kernel (:class:`labkit.course.grade.
    Unverifiable`): the check then decides from the target alone."""
    return isinstance(value, Unverifiable)


def _live(lab, proc):
    if not isinstance(proc, Process):
        raise TypeError("expected the handle that lab.spawn(...) returns")
    info = proc.inspect()
    if not info.get("alive"):
        raise ValueError(f"process {proc.id} is not running any more; start it again")
    return info


def own_hostname(lab, proc, hostname="box1"):
    info = _live(lab, proc)
    if info["shares_with_host"].get("uts"):
        return False, f"/proc/{info['pid']}/ns/uts is the host's: add 'uts' to namespaces"
    seen = proc.exec(["hostname"]).get("stdout", "").strip()
    host = lab.read_file("/proc/sys/kernel/hostname")["text"].strip()
    if seen != hostname:
        return 0.5, f"it has its own UTS namespace, but its hostname is {seen!r}, not {hostname!r}"
    return True, (f"/proc/{info['pid']}/ns/uts differs from the host's; inside, hostname says {seen!r} while "
                  f"the host is still {host!r}.")


def pid_one(lab, proc):
    info = _live(lab, proc)
    nspid = info.get("nspid") or []
    if info["shares_with_host"].get("pid") or len(nspid) < 2:
        return False, "it is in the host's PID namespace: add 'pid' to namespaces"
    if nspid[-1] != 1:
        return 0.5, f"its PID inside is {nspid[-1]}, not 1"
    if info["shares_with_host"].get("mnt"):
        return 0.5, ("it is PID 1 inside, but without its own mount namespace it still reads the host's /proc, "
                     "so ps shows every host process: add 'mnt'")
    ps = proc.exec(["ps", "-o", "pid,comm"]).get("stdout", "")
    n = len([line for line in ps.splitlines()[1:] if line.strip()])
    return True, (f"NSpid {nspid}: PID {nspid[0]} on the host is PID 1 inside, and ps inside lists {n} processes.")


def only_loopback(lab, record):
    facts = getattr(record, "facts", {}) or {}
    ns, host = facts.get("ns") or {}, _host_ns(lab)
    if not ns or ns.get("net") == host.get("net"):
        return False, "that process shared the host's network namespace: add 'net'"
    links = (facts.get("view") or {}).get("links")
    if links != ["lo"]:
        return 0.5, f"it has its own network namespace but saw {links}"
    return True, "a new network namespace starts with nothing but a loopback interface: no way out until we add one."


def root_is_nobody(lab, proc):
    info = _live(lab, proc)
    if info["shares_with_host"].get("user"):
        return False, "it is in the host's user namespace: add 'user'"
    m = info.get("uid_map", "").split()
    if len(m) < 3 or m[0] != "0" or m[1] == "0":
        return 0.5, f"uid_map is {info.get('uid_map')!r}: root inside should map to an unprivileged uid"
    return True, f"uid_map '{info['uid_map']}': uid 0 inside is uid {m[1]} on the host, an unprivileged user."


# -- 03-cgroups ----------------------------------------------------------------------------------

def _cgroup_stats(lab, cg):
    if not isinstance(cg, Cgroup):
        raise TypeError("expected the handle that lab.cgroup(...) returns")
    return cg.stats()


def memory_limit(lab, cg, want=32 << 20):
    s = _cgroup_stats(lab, cg)
    if s["memory_max"] != want:
        return False, f"the group's memory limit is {s['memory_max']} bytes, not {want} (32M)"
    f = "memory.max" if s["mode"] == "v2" else "memory.limit_in_bytes"
    return True, f"the kernel holds the limit in {f}: {want} bytes ({s['mode']} cgroups)."


def oom_killed(lab, cg, record):
    from ..client.records import Record
    if not isinstance(record, Record):  # a dict typed in the notebook is not what the agent answered
        return False, "expected the record that cg.run(...) returned for the hog"
    s = _cgroup_stats(lab, cg)
    code = record.get("exit_code")
    if not s["oom_kills"]:
        return False, "the kernel counted no OOM kill in this group: did the hog run inside it?"
    if code != 137:
        return 0.5, f"the group had an OOM kill, but your process exited with {code}, not 137 (SIGKILL)"
    return True, (f"exit 137 = killed by SIGKILL, and the group's oom_kill counter says {s['oom_kills']}: the "
                  "kernel's OOM killer enforced the limit, inside the group only.")


def cpu_throttled(lab, cg, samples):
    s = _cgroup_stats(lab, cg)
    if s["cpu_quota"] is None:
        return False, "the group has no CPU quota"
    if not s["nr_throttled"]:
        return False, "the group was never throttled: run the busy loop inside it while you sample"
    if _from_the_kernel(samples):
        return True, (f"quota {s['cpu_quota']:g} CPU: the kernel throttled the group in {s['nr_throttled']} of "
                      f"{s['nr_periods']} periods (the samples, computed in the notebook, are not graded).")
    try:
        used = (samples.cpu_usage_us.iloc[-1] - samples.cpu_usage_us.iloc[0]) / 1e6 / (
            samples.t.iloc[-1] - samples.t.iloc[0])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0.5, "the group was throttled, but `samples` is not the DataFrame that cg.sample() returns"
    return True, (f"quota {s['cpu_quota']:g} CPU, the loop got {used:.2f} CPU, throttled in {s['nr_throttled']} "
                  f"of {s['nr_periods']} periods.")


def bomb_defused(lab, cg, samples):
    s = _cgroup_stats(lab, cg)
    if s["pids_max"] is None:
        return False, "the group has no pids limit"
    if not s["pids_refused"]:
        return False, "the kernel refused no fork in this group: did the bomb run inside it?"
    peak = None if samples is None or _from_the_kernel(samples) else int(samples.pids_current.max())
    if peak is not None and peak > s["pids_max"]:
        return False, (f"your samples show {peak} processes in the group, more than its pids.max of {s['pids_max']}: "
                       f"were they taken from this group?")
    return True, (f"the bomb never got past {s['pids_max']} processes; the kernel refused {s['pids_refused']} forks "
                  "and the rest of the machine never noticed.")


# -- 04-overlay-and-images -----------------------------------------------------------------------

def overlay_changes(lab, root):
    if not isinstance(root, OverlayRoot):
        return False, "expected the handle that lab.container_root(...) returns"
    kinds = {c["path"]: c["kind"] for c in root.changes()}
    got = {"copy-up": kinds.get("/etc/hostname") == "file",
           "whiteout": (kinds.get("/etc/os-release") or "").startswith("whiteout"),
           "opaque": (kinds.get("/var/www") or "").startswith("opaque")}
    missing = [k for k, ok in got.items() if not ok]
    if missing:
        return (3 - len(missing)) / 3, ("the upper dir shows no " + ", no ".join(missing) +
                                        ": change /etc/hostname, delete /etc/os-release, replace /var/www")
    return True, ("the upper dir holds exactly the differences: a copied-up /etc/hostname, a 0/0 character "
                  "device where /etc/os-release was, and an opaque /var/www hiding the layer's.")


def committed_image(lab, ref, base="busybox"):
    if ref is None:
        raise ValueError("commit the container first")
    img = lab.image(ref)
    basel = lab.image(base)["layers"]
    if img["layers"][:len(basel)] != basel or len(img["layers"]) != len(basel) + 1:
        return 0.5, f"{ref} has {len(img['layers'])} layers; expected busybox's {len(basel)} plus one"
    return True, (f"{ref} = busybox's layer (shared, stored once) + one new layer "
                  f"{img['layers'][-1][:19]}... made from the upper dir.")


def cached_build(lab, first, again, changed):
    for name, rec in (("first", first), ("again", again), ("changed", changed)):
        if rec is None or "rebuilt" not in rec:
            return False, f"`{name}` is not a build record (lab.build(...))"
    if again["rebuilt"]:
        return 0.3, f"the unchanged rebuild still rebuilt steps {again['rebuilt']}: was the recipe identical?"
    if not changed["rebuilt"] or changed["rebuilt"][0] == 1:
        return 0.5, "the changed build should rebuild from the changed line on, not from the top"
    lab.image(changed["image"]["ref"])  # it exists on the target
    return True, (f"unchanged: nothing rebuilt ({again['seconds']:.3f} s); changed line {changed['rebuilt'][0]}: "
                  f"steps {changed['rebuilt']} rebuilt ({changed['seconds']:.3f} s) vs {first['seconds']:.3f} s "
                  "for the first build.")


def predicted_rebuild(lab, predicted, flipped):
    """``predicted``: the number of steps the student said the second build would rebuild, written before it ran;
    ``flipped``: that build's record (the grader takes it from the agent's journal)."""
    if not hasattr(flipped, "get") or "rebuilt" not in flipped:
        return False, "run the two builds of RECIPE_FLIPPED and keep the second one's record in flipped"
    if isinstance(predicted, bool) or not isinstance(predicted, int):
        return False, "write your prediction first: predicted = the number of steps you expect to be rebuilt"
    real = list(flipped["rebuilt"])
    if real[:1] != [2]:  # (step 1 is FROM; the version line is step 2)
        return 0.3, (f"the second build rebuilt {real}: change only the version (the first RUN) to new_version, "
                     "after one build of version 1")
    if predicted != len(real):
        return 0.5, (f"you predicted {predicted} step(s); the engine rebuilt {len(real)} ({real}): a changed line "
                     "invalidates the cache for itself and for every line below it, so the slow dd ran again")
    return True, (f"as you predicted, {len(real)} steps rebuilt ({flipped['seconds']:.3f} s): with the often-changed "
                  "line on top nothing below it is reused; put it last.")


# -- 05-networking -------------------------------------------------------------------------------

HTTP_GET = ("import sys, time, urllib.request\n"
            "for _ in range(30):\n"
            "    try:\n"
            "        sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode()); break\n"
            "    except OSError:\n"
            "        time.sleep(0.1)\n"
            "else:\n"
            "    sys.exit(1)\n")

def veth_by_hand(lab, commands, red="lk-red", blue="lk-blue", red_ip="10.200.0.1", blue_ip="10.200.0.2"):
    names = lab.list_dir("/run/netns")["entries"]
    missing = [n for n in (red, blue) if n not in names]
    if missing:
        return False, f"there is no network namespace {', '.join(missing)} (ip netns add ...)"
    addrs = lab.run(["ip", "-n", red, "-o", "-4", "addr"]).stdout
    if red_ip not in addrs:
        return 0.3, f"{red} has no address {red_ip}: ip -n {red} addr add {red_ip}/24 dev ..."
    ping = lab.run(["ip", "netns", "exec", red, "busybox", "ping", "-c", "1", "-W", "2", blue_ip])
    if ping.exit_code != 0:
        return 0.6, f"{red} cannot reach {blue_ip}: are both ends up, and is {blue_ip} on the {blue} end?"
    return True, f"a packet went from {red} to {blue} over your veth pair: two namespaces, one virtual cable."


def published_web(lab, web, port=8080):
    if not isinstance(web, Process):
        return False, "expected the handle that lab.spawn(...) returns"
    net = web.inspect().get("net") or {}  # the agent's own entry for it, not what the notebook holds
    if not net:
        return False, "the process is on no network: pass network='default'"
    # the server may still be starting: ask a few times, on the target, as a client on its localhost would
    # (with the target's python3, which the agent runs on anyway; a static busybox wget may lack NSS there)
    got = lab.run(["python3", "-c", HTTP_GET, f"http://127.0.0.1:{port}/"])
    if got.exit_code != 0:
        return 0.5, f"nothing answered on the target's 127.0.0.1:{port}: publish it with ports=['{port}:80']"
    return True, (f"127.0.0.1:{port} on the host reached the web server at {net['ip']}:80 in the container "
                  "through labkit's DNAT rule.")


def container_to_container(lab, web, fetched):
    ip = (web.inspect().get("net") or {}).get("ip") if isinstance(web, Process) else None
    if not ip or fetched is None:
        return False, "start the web container first, then fetch its page from a second container"
    facts = fetched.get("facts", {})
    if not facts.get("net"):
        return 0.3, "the fetching process was not on the network"
    if fetched.get("exit_code") != 0 or "Hello" not in (fetched.get("stdout") or ""):
        return 0.5, f"the second container did not get the page from http://{ip}/"
    return True, (f"{facts['net']['ip']} fetched http://{ip}/ over the bridge: containers on one bridge talk "
                  "directly, like machines on one switch.")


# -- 06-mini-docker ------------------------------------------------------------------------------

def six_steps(lab, ctr, start_record):
    if not isinstance(ctr, Container):
        return False, "expected the handle that lab.create(...) returns"
    info = ctr.inspect()
    if info["State"]["Status"] != "exited":
        return 0.3, f"the container is {info['State']['Status']}: start it and let its command finish"
    net = (start_record or {}).get("facts", {}).get("net") if hasattr(start_record, "get") else None
    if not net:
        return 0.6, "its start record shows no network interface: keep network='default'"
    upper = info["GraphDriver"]["Data"]["UpperDir"]
    if lab.list_dir(upper)["exists"]:
        return True, f"it exited and still exists (docker ps -a); its writable layer is {upper}; it had eth0 with {net['ip']}."
    return True, f"it exited and still exists (docker ps -a); it had eth0 with {net['ip']}."


def web_published(lab, webserver, port=8080, name="webserver"):
    name = getattr(webserver, "name", name)
    try:
        info = lab.container(name).inspect()
    except NotFound:
        return False, f"there is no container named {name!r}"
    if not info["State"]["Running"]:
        return 0.3, f"{name} exists but is not running: start it"
    if "80/tcp" not in info["HostConfig"]["PortBindings"]:
        return 0.5, f"{name} publishes no port 80: create it with ports=['{port}:80']"
    got = lab.run(["python3", "-c", HTTP_GET, f"http://127.0.0.1:{port}/"])
    if got.exit_code != 0:
        return 0.6, f"nothing answers on 127.0.0.1:{port}"
    return True, f"{name} answers on 127.0.0.1:{port} (its own address: {info['NetworkSettings']['IPAddress']})."


def page_changed(lab, marker, port=8080):
    if not marker:
        return False, "write a page that contains your marker text"
    got = lab.run(["python3", "-c", HTTP_GET, f"http://127.0.0.1:{port}/"])
    if marker not in got.stdout:
        return 0.3, f"the page does not contain {marker!r} yet: change /var/www/index.html with exec"
    return True, "the change made with exec is what the server now sends: the container's writable layer holds it."


SHARED_NAME = re.compile(r"127\.0\.0\.1:(\d{4,5})/([a-z0-9]+(?:[._-][a-z0-9]+)*)/web:v1")


def shared_through_registry(lab, shared, pulled, origin="course/web:v1"):
    """``shared``: the name the image was pushed and pulled back as; ``pulled``: the record of ``lab.pull(shared)``
    (the grader takes it from the agent's own journal). Decided from the registry's API and the local store."""
    m = SHARED_NAME.fullmatch(shared) if isinstance(shared, str) else None
    if not m:
        return False, f"tag {origin} as 127.0.0.1:5000/<your name>/web:v1 and keep that name in shared"
    port, repo = int(m[1]), f"{m[2]}/web"
    try:
        tags = lab.call("registry.get", path=f"/v2/{repo}/tags/list", port=port)
        held = lab.call("registry.get", path=f"/v2/{repo}/manifests/v1", port=port)
    except LabkitError as exc:
        return False, f"no registry answered on 127.0.0.1:{port}: {exc.message} (start it: lab.registry())"
    if tags["status"] != 200 or "v1" not in ((tags["json"] or {}).get("tags") or []) or not held["digest"]:
        return 0.2, f"the registry does not hold {repo}:v1: push {shared}"
    facts = getattr(pulled, "facts", None)
    if not isinstance(facts, dict) or "layers_fetched" not in facts:
        return 0.4, f"pushed; now remove the name (lab.rmi) and pull {shared} back, keeping what lab.pull returns"
    if facts.get("digest") != held["digest"]:
        return 0.4, (f"that pull got manifest {facts.get('digest')}, the registry holds {held['digest']} for "
                     f"{repo}:v1: pull {shared} again")
    try:
        local = lab.image(shared)
    except LabkitError:
        return 0.5, f"{shared} is not on this machine any more: pull it back (and leave it until the check)"
    if (local.get("source") or {}).get("digest") != held["digest"]:
        return 0.5, f"the local {shared} did not come from this pull: rmi it, then pull it again"
    if facts.get("up_to_date"):
        return 0.8, (f"that pull found {shared} already here, as the registry has it (\"Image is up to date\"): "
                     f"remove the name (lab.rmi), then pull it back")
    if facts["layers_fetched"] or not facts.get("layers_present"):
        return 0.8, (f"the pull fetched {len(facts['layers_fetched'])} layer(s) again: remove only the name "
                     f"{shared}, keep {origin} (which has the same layers), then pull")
    return True, (f"pushed and pulled back: the manifest digest {held['digest'][:19]}... is the same on both sides, "
                  f"and the pull fetched none of the {len(facts['layers_present'])} layers this machine already had.")


def volume_kept(lab, volume):
    """``volume``: the name of the volume both containers used. Live: it exists, holds note.txt with a name in it,
    and no container made with it is left (the data outlived both)."""
    if not isinstance(volume, str) or not volume:
        return False, "keep the volume's name in volume (e.g. notes-yourname) and use it as volumes=[f'{volume}:/data']"
    try:
        row = lab.call("volume.inspect", name=volume)
    except LabkitError:
        return 0.2, f"there is no volume {volume!r} on the target: run the writer with volumes=[f'{{volume}}:/data']"
    name = volume[len("notes-"):] if volume.startswith("notes-") else None
    note = next((f for f in row["files"] if f["name"] == "note.txt"), None)
    if note is None or note["kind"] != "file":  # (a link is never read: it could point anywhere on the target)
        return 0.4, f"the volume {volume} holds no file note.txt: write your name to /data/note.txt"
    text = lab.call("read_file", path=f"{row['mountpoint']}/note.txt", limit=4096)["text"].strip()
    if not name or text != name:
        return 0.5, f"note.txt in {volume} does not hold your name ({name!r}): name the volume notes-<me>, write <me>"
    if row["used_by"]:
        return 0.7, f"container(s) {', '.join(row['used_by'])} still exist: rm them, and the volume keeps the note"
    return True, (f"both containers are gone and {volume} still holds your note: a volume outlives rm; the file in "
                  "the writable layer (/tmp/scratch.txt) went with its container.")


def made_over_rest(lab, rest_name):
    """``rest_name``: the container the student asked the Engine API for. Live: it exists, made from busybox and
    never started, and the daemon's own access log holds the POST that created it."""
    if not isinstance(rest_name, str) or not re.fullmatch(r"lk-rest-[a-z0-9-]+", rest_name):
        return False, "keep the container's name, f'lk-rest-{me}', in rest_name"
    try:
        info = lab.call("container.inspect", ref=rest_name)
    except LabkitError:
        return 0.2, f"there is no container {rest_name}: POST /v1.41/containers/create?name={rest_name} to the daemon"
    log = lab.call("read_file", path="/run/labkit/dockerapi.log", limit=1 << 20)["text"]
    # (a line the daemon wrote for a request it routed: its time, then the method and path as sent)
    asked = re.search(r"^\d\d:\d\d:\d\d POST (/v[0-9.]+)?/containers/create\?name=" + re.escape(rest_name)
                      + r"( |$)", log, re.M)
    if not asked:
        return 0.4, f"{rest_name} exists, but the daemon's Engine API did not make it: send the POST yourself (d.api)"
    if info["Config"]["Image"] != "busybox:latest" and info["Config"]["Image"] != "busybox":
        return 0.6, f"{rest_name} was made from {info['Config']['Image']}: ask for busybox"
    if info["State"]["Status"] != "created":
        return 0.8, f"{rest_name} is {info['State']['Status']}: create it only (docker create), do not start it"
    return True, (f"the daemon made {rest_name} because you asked it over REST ({asked.group(0).split()[1][:60]}): "
                  "the docker CLI sends the same request for `docker create`.")


def torn_down(lab, rmi_error, name="webserver", image="course/web:v1"):
    """``rmi_error``: the refusal's text, which names the container's state when rmi was refused."""
    if not rmi_error or "used by container" not in str(rmi_error):
        return 0.3, "stop the container, then try `rmi` while it still exists, and keep the error it gives"
    if f"{name} (running)" in str(rmi_error):
        return 0.4, (f"{name} was still running when you tried rmi: stop it first, as the lecture does — the refusal "
                     "worth seeing is the one for a container that runs nothing")
    names = [c["name"] for c in lab.containers(all=True)]
    if name in names:
        return 0.5, f"{name} still exists: stop and rm it"
    if image in [i["ref"] for i in lab.images()]:
        return 0.7, f"{image} is still there: rmi it once the container is gone"
    return True, "stop, rm, then rmi: an image cannot go while any container, even a stopped one, was made from it."


# -- 07-containers-vs-vms ------------------------------------------------------------------------

def needs_vm(check):
    """Mark a check that cannot pass without the VM baseline: on a target that cannot boot one, the Checker
    scores it zero with the target's own reason (asked here, not taken from the notebook), before anything else."""
    def unavailable(lab):
        why = lab.vm_missing()
        return f"this target cannot boot the VM this question needs: {why}" if why else None
    check.unavailable = unavailable
    return check


@needs_vm
def kernel_instances(lab, boot_ids, vm):
    """boot_ids = {'host', 'container', 'vm'}: checked against the host's boot id and the live VM's."""
    if not isinstance(boot_ids, dict) or not {"host", "container", "vm"} <= set(boot_ids):
        return False, "expected a dict with the keys 'host', 'container' and 'vm'"
    if not isinstance(vm, VirtualMachine):
        return False, "expected the handle that lab.vm_start(...) returns"
    host = lab.read_file("/proc/sys/kernel/random/boot_id")["text"].strip()
    guest = vm.exec("cat /proc/sys/kernel/random/boot_id")["stdout"].strip()
    got = {k: str(v).strip() for k, v in boot_ids.items()}
    if got["host"] != host:
        return 0.2, "boot_ids['host'] is not the target's boot id: read /proc/sys/kernel/random/boot_id with lab.read_file"
    if got["container"] != host:
        return 0.4, ("boot_ids['container'] should be what a process in a container reads: run cat on the same file "
                     "with lab.run_in(..., rootfs=...)")
    if got["vm"] != guest:
        return 0.6, "boot_ids['vm'] is not what the VM reads: vm.exec('cat /proc/sys/kernel/random/boot_id')"
    return True, (f"the container reads the host's boot id ({host[:8]}…): one kernel, booted once, shared. The VM "
                  f"reads {guest[:8]}…: a second kernel, booted a moment ago, inside qemu.")


def _bench_from_journal(result):
    """What the agent measured for the harness, read from the grader's journal: (env, experiments, cases)."""
    envs = result.called("bench.environment")
    seen, cases = set(), {"native"} if result.called("bench.native") else set()
    for method, case in (("bench.container", "container"), ("bench.vm", "vm")):
        if result.called(method):
            cases.add(case)
    for method in ("bench.native", "bench.container", "bench.vm"):
        seen |= {e["params"].get("workload") for e in result.called(method)}
    seen |= {"net-" + str(e["params"].get("mode")) for e in result.called("bench.net_measure")}
    if result.called("bench.startup_sample"):
        seen.add("startup")
    if result.called("bench.container_footprint") or result.called("bench.vm_footprint"):
        seen.add("density")
    return (envs[-1]["result"] if envs else None), seen, cases


@needs_vm
def bench_ran(lab, result):
    from .bench import BenchResult, EXPERIMENTS
    if _from_the_kernel(result):  # the grader: the result was computed in the notebook; the journal has the runs
        env, seen, cases = _bench_from_journal(result)
        if env is None:
            return False, "run the harness: result = bench.run(lab, mode)"
        missing = [e for e in EXPERIMENTS if e not in seen]
        if missing:
            return 0.6, f"some experiments are missing: {', '.join(missing)} (run all of them)"
        if not {"native", "container", "vm"} <= cases:
            return 0.7, "run the three cases: native, container and vm"
        return True, f"every experiment measured on this target, the VM under {str(env.get('vm_accel', '?')).upper()}."
    if not isinstance(result, BenchResult):
        return False, "expected what bench.run(lab, ...) returns"
    truth = lab.run(["uname", "-r"]).stdout.strip()
    if result.env.get("kernel") != truth:
        return 0.2, "that result was not measured on this target"
    missing = [e for e in EXPERIMENTS if e not in set(result.samples["experiment"])]
    if missing:
        return 0.6, f"some experiments are missing: {', '.join(missing)} (run all of them)"
    cases = set(result.samples["case"])
    if not {"native", "container", "vm"} <= cases:
        return 0.7, "run the three cases: native, container and vm"
    accel = result.env.get("vm_accel_used", "?").upper()
    if result.accel_label() != f"VM ({accel})":
        return 0.8, "the VM's label must say how it was accelerated"
    cpu = result.ratios().loc["cpu", "container"]
    note = ("within a few percent of native, as expected: a container runs on the host's CPU and kernel with "
            "nothing in between" if abs(cpu - 1) < 0.05 else
            f"{cpu:.2f}× native: more than a few percent. Look for noise (the other core busy?) and re-run; "
            "the harness interleaves, so both cases saw the same machine")
    return True, f"every experiment measured, VM under {accel}. Container CPU time: {note}."


@needs_vm
def read_the_numbers(lab, result, answers):
    if not isinstance(answers, dict):
        return False, "expected a dict of your three numbers"
    if _from_the_kernel(result):  # the grader: the numbers are read again from what the agent measured
        from .bench import BenchResult
        runs = BenchResult.from_journal(result.journal)
        if not runs:
            return False, "run the harness: result = bench.run(lab, mode)"
        best = None
        for run in runs:  # the answers may come from any run of the harness this notebook made
            try:
                got = _read_the_numbers(run, answers)
            except (KeyError, ZeroDivisionError, IndexError, ValueError):
                continue
            if best is None or _fraction(got[0]) > _fraction(best[0]):
                best = got
        return best or (False, "the runs of the harness on this target do not have the figures to read")
    from .bench import BenchResult
    if not isinstance(result, BenchResult):
        return False, "expected what bench.run(lab, ...) returns"
    return _read_the_numbers(result, answers)


def _fraction(passed):
    return 1.0 if passed is True else 0.0 if passed is False else float(passed)


def _read_the_numbers(result, answers):
    r = result.ratios()
    vm = result.accel_label()
    _, start = result.medians("startup")
    _, last = result.medians("density")
    truth = {"cpu_ratio": r.loc["cpu", "container"], "vm_start_over_labkit": start[vm] / start["labkit"],
             "vm_over_container_memory": last[vm] / last["container"]}
    wrong = []
    for key, want in truth.items():
        try:
            got = float(answers.get(key))
        except (TypeError, ValueError):
            wrong.append(f"{key} is missing")
            continue
        if abs(got - want) > 0.05 * abs(want):
            wrong.append(f"{key}: {got:g} is not {want:.3g}")
    if wrong:
        return (3 - len(wrong)) / 3, "; ".join(wrong) + " (read them from result.ratios() and result.summary())"
    return True, (f"right. A container costs {truth['cpu_ratio']:.2f}× native CPU time, starts "
                  f"{truth['vm_start_over_labkit']:.0f}× sooner than the VM, and idles in "
                  f"{truth['vm_over_container_memory']:.0f}× less memory.")


# -- 08-security ---------------------------------------------------------------------------------

def capabilities_dropped(lab, record):
    spec = _spec_of(record)
    if not spec:
        return False, "expected the record lab.run_in(...) returns"
    keep = spec.get("cap_keep")
    if keep is None:
        return 0.2, "the process kept every capability: pass cap_keep=DOCKER_DEFAULT_CAPS"
    if "CAP_SYS_ADMIN" in keep:
        return 0.4, "CAP_SYS_ADMIN is still kept: it is the one that allows sethostname, mount and much more"
    if "uts" not in spec.get("namespaces", []):
        return 0.4, "give it a UTS namespace: without one a permitted sethostname would rename the host"
    if record.exit_code == 0 or "not permitted" not in (record.stderr or ""):
        return 0.6, "the hostname change should have failed with 'Operation not permitted'"
    eff = next((ln.split()[1] for ln in (record.stdout or "").splitlines() if ln.startswith("CapEff:")), None)
    from .security import decode_caps
    if eff is None or sorted(decode_caps(eff)) != sorted(keep):
        return 0.8, "print the process's CapEff line first (grep CapEff /proc/self/status)"
    return True, (f"root inside, but with {len(keep)} capabilities and not CAP_SYS_ADMIN: even in its own UTS "
                  "namespace it may not rename itself. Root is a set of capabilities, and they can be taken away.")


def uid_shifted(lab, rootfs, path="/tmp/mine"):
    if not isinstance(rootfs, Rootfs):
        return False, "expected the rootfs handle"
    res = lab.run(["stat", "-c", "%u", rootfs.path + path])
    if res.exit_code != 0:
        return 0.2, f"{path} does not exist in the rootfs: create it from inside the user namespace"
    uid = int(res.stdout.strip())
    if uid == 0:
        return 0.4, "the file belongs to the host's root: the process was not in a user namespace"
    if uid != 100000:
        return 0.7, f"the file belongs to uid {uid} on the host; map root to 100000: id_map=((0, 100000, 65536),)"
    return True, ("inside it was root's file (uid 0); on the host it belongs to uid 100000, an unprivileged user: "
                  "whatever root in the container does, it does as nobody on the host.")


def seccomp_blocked(lab, rootfs, record, path="/newdir"):
    spec = _spec_of(record)
    if not spec:
        return False, "expected the record lab.run_in(...) returns"
    if "mkdir" not in spec.get("seccomp_deny", ()) and "mkdirat" not in spec.get("seccomp_deny", ()):
        return 0.2, "deny mkdir: seccomp_deny=['mkdir']"
    if not any(s.get("call") == "prctl" and "PR_SET_SECCOMP" in s.get("args", []) for s in record.steps):
        return 0.4, "the record shows no seccomp filter being installed"
    if "not permitted" not in (record.stderr or ""):
        return 0.6, f"mkdir {path} should have failed with 'Operation not permitted'"
    if lab.list_dir(rootfs.path + path)["exists"]:
        return 0.7, f"{path} exists in the rootfs: did it run without the filter?"
    return True, ("the filter answered EPERM before the kernel did any work: root, every capability, and still no "
                  "mkdir. Docker's default profile refuses about 44 syscalls the same way.")


def read_only_refused(lab, rootfs, record, path="/etc/owned"):
    spec = _spec_of(record)
    if not spec or not spec.get("read_only"):
        return 0.3, "mount the root read-only: read_only=True"
    if "Read-only file system" not in (record.stderr or ""):
        return 0.6, f"writing {path} should have failed with 'Read-only file system'"
    if lab.list_dir(rootfs.path + "/etc")["exists"] and "owned" in lab.list_dir(rootfs.path + "/etc")["entries"]:
        return 0.7, f"{path} exists in the rootfs"
    return True, "the kernel refused the write (EROFS): an attacker inside cannot plant files in the image."


def hardened_holds(lab, rootfs, hardened):
    """Re-runs every escape attempt with the student's options: all must be blocked."""
    from .security import escape_attempts
    if not isinstance(hardened, dict) or "user" not in (hardened.get("namespaces") or []):
        return 0.2, "a hardened container needs a user namespace: add 'user' to namespaces (and an id_map)"
    table, why = escape_attempts(lab, rootfs.name, {"yours": hardened})
    escaped = [a for a, v in table["yours"].items() if v != "blocked"]
    if escaped:
        return 1 - len(escaped) / len(table), "still possible: " + "; ".join(f"{a} ({why['yours'][a]})" for a in escaped)
    return True, "every attempt was blocked, each by the kernel's own answer (see the reasons table)."


@needs_vm
def kernel_shared_by(lab, iso, answer):
    from .isolation import IsolationResult, default_configs
    if _from_the_kernel(iso):  # the grader: the matrix was computed in the notebook; the journal says what ran
        ran_vm = bool(iso.called("vm.start"))
        truth = {label for label, _ in default_configs()}
    elif isinstance(iso, IsolationResult):
        host = lab.read_file("/proc/sys/kernel/random/boot_id")["text"].strip()
        truth = {label for label, f in iso.facts.items() if f.get("boot_id") == host}
        ran_vm = not all(f.get("boot_id") == host for f in iso.facts.values())
    else:
        return False, "expected what isolation.isolation_matrix(lab, ...) returns"
    if not ran_vm:
        return 0.3, "run the matrix with vm=True: without a VM every row shares the kernel"
    got = set(answer or [])
    if got != truth:
        return 0.5, f"not quite: {sorted(truth - got)} missing, {sorted(got - truth)} wrong (read the kernel column)"
    return True, (f"{len(truth)} configurations share the host's kernel: one kernel bug (Dirty COW) reaches all of "
                  "them; the VM's guest kernel is a second wall.")


# -- 09-orchestration ----------------------------------------------------------------------------

CLUSTER9 = "lab9"


def cluster_ready(lab, made, cluster=CLUSTER9):
    """``made``: what cluster.create answered. Live: the cluster has a manager and two workers, all ready."""
    name = ((made.get("cluster") or {}).get("name") if hasattr(made, "get") else None)
    if name is None:
        return False, "expected what lab.call('cluster.create', spec=...) answered"
    if name != cluster:
        return 0.2, f"that is cluster {name!r}: this lab's cluster is named {cluster!r}"
    try:
        info = lab.call("cluster.inspect", name=cluster)
    except NotFound:
        return 0.2, f"there is no cluster {cluster!r} on the target (any more)"
    roles = sorted(n["role"] for n in info["nodes"])
    if roles != ["manager", "worker", "worker"]:
        return 0.5, f"the cluster's nodes have roles {roles}: make one manager and two workers (workers=2)"
    down = [n["name"] for n in info["nodes"] if lab.call("node.inspect", node_id=n["id"])["status"] != "ready"]
    if down:
        return 0.7, f"{', '.join(down)} is not ready: its engine does not answer"
    addrs = ", ".join(f"{n['name']} {n['ip']}" for n in info["nodes"])
    return True, f"three machines, one manager and two workers, each with an engine that answers: {addrs}."


def _cases_and_answers(cases, answers, needed):
    """(cases, answers) as lists of equal length, or the reason they are not."""
    if not isinstance(cases, (list, tuple)) or not isinstance(answers, (list, tuple)):
        return "expected the list of cases and the list of your answers, one per case"
    if len(cases) != len(answers):
        return f"{len(answers)} answers for {len(cases)} cases: answer every case, in order"
    if len(cases) < needed or not all(isinstance(c, dict) for c in cases):
        return f"the cases are not the notebook's ({len(cases)} of them): run the cell that builds them as written"
    return None


def spread_cases(lab, cases, answers):
    """Pure: ``answers[i]`` is the student's spread() on ``cases[i]`` (plain dicts: service, nodes, tasks); each
    is compared with :func:`labkit.wire.orchestration.schedule` on the same case. Partial credit by cases right."""
    from ..wire.orchestration import schedule
    from .orchestrate import spread_args
    why = _cases_and_answers(cases, answers, 6)
    if why:
        return False, why
    parsed = [spread_args(c) for c in cases]
    want = [schedule(s, 1, nodes, tasks) for s, nodes, tasks in parsed]
    covered = (any(n.status != "ready" for _, nodes, _ in parsed for n in nodes)
               and any(n.availability != "active" for _, nodes, _ in parsed for n in nodes)
               and any(not t.live for _, _, tasks in parsed for t in tasks) and None in want)
    if not covered:
        return False, "the cases are not the notebook's: run the cell that builds them as written"
    wrong = [f"{c.get('title', f'case {i + 1}')!r} (you chose {a!r})" for i, (c, a, w) in
             enumerate(zip(cases, answers, want)) if a != w]
    if wrong:
        return (len(cases) - len(wrong)) / len(cases), (
            f"{len(cases) - len(wrong)} of {len(cases)} right; not: {'; '.join(wrong)}. Which nodes may take a task "
            "at all, which tasks still count, and what decides between two nodes with equal counts?")
    return True, (f"all {len(cases)} right: ready and active nodes only; the fewest live tasks of this service, then "
                  "the fewest in all, then the name. That is Swarm's spread strategy.")


def _action_key(row):
    """An action as compared: a start by where it puts which slot; a stop or mark by the task and its new states."""
    if not isinstance(row, dict) or row.get("kind") not in ("start", "stop", "mark"):
        return ("?", repr(row)[:60])
    if row["kind"] == "start":
        return ("start", row.get("service"), row.get("slot"), row.get("node"))
    return (row["kind"], row.get("task"), row.get("desired"), row.get("state"))


def reconcile_cases(lab, cases, answers):
    """Pure: ``answers[i]`` is ``orchestrate.summary(my_reconcile(...))`` on ``cases[i]``; compared, as a set of
    actions, with what :func:`labkit.wire.orchestration.reconcile` does on the same case."""
    from ..wire.orchestration import reconcile
    from .orchestrate import reconcile_args, summary
    why = _cases_and_answers(cases, answers, 5)
    if why:
        return False, why
    wrong = []
    for i, (case, got) in enumerate(zip(cases, answers)):
        want = sorted(map(_action_key, summary(reconcile(*reconcile_args(case)))), key=repr)
        mine = sorted(map(_action_key, got if isinstance(got, (list, tuple)) else [got]), key=repr)
        if mine != want:
            wrong.append(f"{case.get('title', f'case {i + 1}')!r}")
    if not any(answers):
        return False, "your step returned no action in any case: a new service alone needs some"
    if wrong:
        return (len(cases) - len(wrong)) / len(cases), (
            f"{len(cases) - len(wrong)} of {len(cases)} right; not: {', '.join(wrong)}. Look at the actions you "
            "returned there: which tasks still hold their slot, and does each new task count when you place the next?")
    return True, (f"all {len(cases)} right: orphaned what a dead node held, stopped what is above the replicas, and "
                  "started each missing slot where spread puts it, counting the tasks this step already started.")


def control_loop(lab, rounds, cluster=CLUSTER9, service="web"):
    """``rounds``: the student's loop's log (a list, a row per round). Live: ``service`` has all its replicas
    running, one per node."""
    if not isinstance(rounds, (list, tuple)) or not rounds:
        return False, "expected the list your loop filled, one row per round"
    try:
        rows = {s["name"]: s for s in lab.call("service.ls", name=cluster)}
    except NotFound:
        return False, f"there is no cluster {cluster!r} on the target"
    if service not in rows:
        return 0.2, f"cluster {cluster} has no service {service!r}: run the cell that creates it"
    from .orchestrate import running
    tasks = running(lab, cluster, service)
    want = rows[service]["replicas"]
    if len(tasks) < want:
        return 0.4, (f"{len(tasks)} of {want} tasks of {service} run: go round again (observe, reconcile, act) until "
                     "every slot has a running task")
    nodes = sorted(t["node"] for t in tasks)
    if len(set(nodes)) != len(nodes) or len(tasks) != want:
        return 0.7, f"the {len(tasks)} running tasks sit on {nodes}: spread puts one on each node"
    return True, (f"{want} tasks running, one on each of {', '.join(nodes)}, after {len(rounds)} rounds of your loop: "
                  "observe, decide, act. The manager's own loop does nothing else, ten times a second.")


def _settle(read, settled, seconds, every=0.3):
    """What ``read()`` returns once ``settled`` holds for it, or after ``seconds``, whichever comes first: the
    manager's loop acts on its own clock, and on a slow, emulated machine a task takes seconds to start and pass
    its health check, so a check that reads a cluster once can catch it mid-step."""
    import time
    deadline = time.monotonic() + seconds
    while True:
        got = read()
        if settled(got) or time.monotonic() > deadline:
            return got
        time.sleep(every)



def node_died(lab, victim, cluster=CLUSTER9, service="web", node="worker1", seconds=15):
    """``victim``: the id of the node the student cut. Live: it is down (killed, not frozen), and ``service`` has
    all its replicas running elsewhere (the manager's loop is given up to ``seconds`` to get there)."""
    want = f"{cluster}-{node}"
    if victim != want:
        return False, f"cut {node}'s power: a node's id is <cluster>-<node>, and {victim!r} is not {node}'s"
    try:
        status = lab.call("node.inspect", node_id=want)["status"]
    except NotFound:
        return False, f"there is no node {want} on the target"
    if status == "paused":
        return 0.3, f"{node} is frozen (paused: a hung machine); a power cut kills everything on it at once"
    if status != "down":
        return 0.3, f"{node} is {status}: it still runs"
    from .orchestrate import running
    want_n = next((s["replicas"] for s in lab.call("service.ls", name=cluster) if s["name"] == service), 0)

    def back(tasks):
        return len(tasks) >= want_n and not any(t["node"] == node for t in tasks)
    tasks = _settle(lambda: running(lab, cluster, service), back, seconds)
    if not back(tasks):
        return 0.6, (f"{len(tasks)} of {want_n} tasks of {service} run, on {sorted(t['node'] for t in tasks)}: is the "
                     f"manager's loop running (cluster.manage)?")
    lost = [t for t in lab.call("service.ps", name=cluster, service=service) if t["node"] == node]
    return True, (f"{node} is down and the tasks it ran are orphaned ({', '.join(t['id'] for t in lost)}); "
                  f"{want_n} tasks run again, on {', '.join(sorted(t['node'] for t in tasks))}: the manager put "
                  f"the lost slots back elsewhere.")


def mesh_answers(lab, answered, cluster=CLUSTER9, port=8090):
    """``answered``: {address: [what answered there, ...]} from the student's requests to the published port.
    Live: the grader asks the port itself on 127.0.0.1 and every live node's address."""
    from .orchestrate import fetch_many, live_nodes
    if not isinstance(answered, dict):
        return False, "expected a dict: {address: [the answers you got there]}"
    try:
        live = live_nodes(lab, cluster)
    except NotFound:
        return False, f"there is no cluster {cluster!r} on the target"
    addresses = ["127.0.0.1"] + list(live.values())
    missing = [a for a in addresses if not answered.get(a)]
    if missing:
        return 0.4, f"no answers for {', '.join(missing)}: ask the port on 127.0.0.1 and on every live node's address"
    mine = {str(a) for v in answered.values() if isinstance(v, (list, tuple)) for a in v if a}
    if len(mine) < 2:
        return 0.6, "every request got the same answer: ask each address several times (the mesh takes turns)"
    urls = [f"http://{a}:{port}/" for a in addresses for _ in range(3)]
    got = fetch_many(lab, urls)
    seen = {g for g in got if g}
    silent = sorted({u.split('/')[2] for u, g in zip(urls, got) if g is None})
    if silent:
        return 0.7, f"the grader's own requests got no answer from {', '.join(silent)}"
    if len(seen) < 2:
        return 0.8, f"the grader's own requests were all answered by {seen}: the mesh did not balance"
    return True, (f"port {port} answered on {len(addresses)} addresses, and {len(seen)} different tasks took turns: "
                  "every node DNATs the port to the service's running tasks, wherever they run.")


def stack_works(lab, deployed, cluster=CLUSTER9, stack="demo", port=8091, front="front", api="api", seconds=15):
    """``deployed``: what stack.deploy answered. Live: the stack's services all run, the front answers on
    ``port``, and ``api`` resolves and answers from inside a front task."""
    import time
    from .orchestrate import ask_by_name, fetch
    if not hasattr(deployed, "get") or deployed.get("stack") is None:
        return False, "expected what lab.call('stack.deploy', ...) answered"
    if deployed.get("stack") != stack:
        return 0.1, f"that deployed stack {deployed.get('stack')!r}: this lab's is {stack!r}"
    try:
        names = [s["name"] for s in lab.call("stack.ls", name=cluster)]
    except NotFound:
        return False, f"there is no cluster {cluster!r} on the target"
    if stack not in names:
        return 0.2, f"stack {stack} is not deployed (any more)"
    members = {f"{stack}_{front}", f"{stack}_{api}"}

    def stack_rows():
        return {s["name"]: s for s in lab.call("service.ls", name=cluster) if s["name"].startswith(stack + "_")}

    def short_of(rows):
        return [f"{n} ({r['running']}/{r['replicas']})" for n, r in sorted(rows.items())
                if r["running"] < r["replicas"]]
    # a stack deployed a moment ago may still be starting its tasks
    rows = _settle(stack_rows, lambda rows: not short_of(rows) and members <= set(rows), seconds, every=0.2)
    short = short_of(rows)
    if not members <= set(rows):
        return 0.3, f"the stack has {sorted(rows)}: it needs {sorted(members)}"
    if rows[f"{stack}_{api}"]["replicas"] < 2:
        return 0.4, f"{stack}_{api} has {rows[f'{stack}_{api}']['replicas']} replica: give it 2 (deploy: replicas)"
    if short:
        return 0.5, f"not every task runs: {', '.join(short)}"
    # (the manager writes the mesh just after it records the tasks running: a moment's grace, a few tries)
    for _ in range(5):
        page = fetch(lab, f"http://127.0.0.1:{port}/", limit=2)
        ok, said = ask_by_name(lab, cluster, f"{stack}_{front}", api, limit=2)
        if page is not None and ok:
            break
        time.sleep(0.3)
    if page is None:
        return 0.6, f"nothing answers on port {port}, which the front publishes: is the front running?"
    if not ok:
        return 0.7, f"from inside a {front} task, http://{api}/ did not answer ({said}): does {api} serve port 80?"
    return True, (f"{len(rows)} services run; the front answers on {port}, and from inside it the name {api!r} "
                  f"reached a task of {stack}_{api} ({said}) through the service's virtual address.")


def rolled_back(lab, rollout, prediction, cluster=CLUSTER9, service="web", broken="course/web:broken", seconds=60):
    """``rollout``: what the student's service.update answered; ``prediction``: the image they said every task
    would run at the end. Live: the update to ``broken`` was rolled back and every running task runs the
    previous image (an update or rollback still under way is given up to ``seconds`` to end: on a slow,
    emulated machine each task of a rollback takes seconds to start and pass its health check)."""
    from .orchestrate import running
    if not hasattr(rollout, "get"):
        return False, "expected what lab.call('service.update', ...) answered"

    def settled(read):
        info, tasks = read
        state = (info.get("update") or {}).get("state")
        return not (state in ("updating", "rollback_started") or (
            state == "rollback_completed" and len(tasks) < info["spec"]["replicas"]))
    try:
        info, tasks = _settle(lambda: (lab.call("service.inspect", name=cluster, service=service),
                                       running(lab, cluster, service)), settled, seconds)
    except NotFound:
        return False, f"there is no service {service} in cluster {cluster} on the target"
    update = info.get("update") or {}
    previous = (info.get("previous") or {}).get("image")
    if previous != broken and info["spec"]["image"] != broken:
        return 0.2, f"{service} was never updated to {broken}: start that update"
    if update.get("state") != "rollback_completed":
        return 0.4, f"the update is {update.get('state')!r}, not rolled back yet ({update.get('message', '')})"
    images = {t["image"] for t in tasks}
    if images != {info["spec"]["image"]} or len(tasks) != info["spec"]["replicas"]:
        return 0.6, (f"running: {len(tasks)} tasks of {sorted(images)}; wanted {info['spec']['replicas']} of the "
                     "previous image")
    target = str(prediction).strip()
    if target != info["spec"]["image"] and target + ":latest" != info["spec"]["image"]:
        return 0.8, (f"rolled back, but you predicted {prediction!r}: every task runs {info['spec']['image']}, the "
                     "image of the spec before the failed update")
    return True, (f"the broken image failed its health check, the manager rolled the update back, and all "
                  f"{len(tasks)} tasks run {info['spec']['image']} again, as you predicted. ({update.get('message')})")
