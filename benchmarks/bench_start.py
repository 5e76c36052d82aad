"""Benchmark: container start latency, labkit next to crun and runc, on the same root, in the same run.

Each case creates and starts a container running /bin/true, with PID, mount, UTS, IPC and network
namespaces, a cgroup and an overlay root (one busybox overlay root, mounted once and used by all three
as their bundle's rootfs), and waits for it to exit. The cases are interleaved, after a warm-up; the
figures are min / median / max milliseconds and each median's ratio to crun's.

crun refuses hybrid cgroup hosts ("cgroups in hybrid mode not supported, drop all controllers from
cgroupv2"); its workaround here: run it in a private mount namespace in which the almost empty cgroup2
mount at /sys/fs/cgroup/unified is unmounted, so crun sees a v1 host. That is reported with the figures.

    sudo .venv/bin/python benchmarks/bench_start.py [--runs 20]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import labkit  # noqa: E402
from labkit.agent import cgroups  # noqa: E402

NS = ["pid", "mnt", "uts", "ipc", "net"]


def oci_config(rootfs, cgroups_path):
    return {"ociVersion": "1.0.2", "root": {"path": rootfs, "readonly": False},
            "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["/bin/true"], "cwd": "/",
                        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                        "capabilities": {k: ["CAP_KILL", "CAP_NET_BIND_SERVICE"] for k in
                                         ("bounding", "effective", "permitted")}},
            "hostname": "bench",
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                       {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", "nosuid", "noexec"]}],
            "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "uts", "ipc", "network")],
                      "cgroupsPath": cgroups_path, "resources": {"pids": {"limit": 64}}}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    lab = labkit.connect("local")
    mode = cgroups.detect()["mode"]
    root = lab.container_root("busybox", "bench-start")
    cg = lab.cgroup("bench-start", pids=64)
    bundle = tempfile.mkdtemp(prefix="labkit-bundle-")
    notes = []
    try:
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(oci_config(root.merged, "/labkit/bench-oci"), f)
        cases = {"labkit": lambda i: lab.run_in(["/bin/true"], NS, rootfs=root.merged, root_mode="pivot_root",
                                                cgroup=cg.name, look=False)}
        for runtime in ("crun", "runc"):
            exe = shutil.which(runtime)
            if not exe:
                notes.append(f"{runtime}: not installed (apt-get install {runtime})")
                continue
            cmd = [exe, "run", "--bundle", bundle]
            if runtime == "crun" and mode == "hybrid":
                cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'umount /sys/fs/cgroup/unified && exec "$@"', "sh"] + cmd
                notes.append("crun: hybrid cgroups, run with the cgroup2 mount hidden in a private mount namespace")
            probe = subprocess.run(cmd + ["lkb-probe"], capture_output=True, text=True)
            if probe.returncode != 0:
                notes.append(f"{runtime}: unavailable here: {probe.stderr.strip()[-200:]}")
                continue
            cases[runtime] = (lambda c: lambda i: subprocess.run(c + [f"lkb-{i}"], check=True,
                                                                  capture_output=True))(cmd)
        times = {k: [] for k in cases}
        for i in range(3):  # warm-up
            for fn in cases.values():
                fn(f"w{i}")
        for i in range(args.runs):
            for name, fn in cases.items():  # interleaved
                t = time.perf_counter()
                fn(f"{name}-{i}")
                times[name].append((time.perf_counter() - t) * 1000)
    finally:
        root.remove()
        cg.remove()
        shutil.rmtree(bundle, ignore_errors=True)
        for d in cgroups.labkit_groups()[0]:
            if d.endswith("/bench-oci"):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
    ref = statistics.median(times["crun"]) if "crun" in times else None
    print(f"container start, /bin/true to exit: {args.runs} runs per case, interleaved; {mode} cgroups, "
          f"kernel {os.uname().release}, {os.uname().machine}")
    print(f"{'runtime':<10}{'min ms':>9}{'median ms':>11}{'max ms':>9}{'vs crun':>9}")
    for name, xs in times.items():
        med = statistics.median(xs)
        ratio = f"{med / ref:>9.2f}" if ref else f"{'-':>9}"
        print(f"{name:<10}{min(xs):>9.1f}{med:>11.1f}{max(xs):>9.1f}{ratio}")
    for n in notes:
        print("note:", n)
    return times


if __name__ == "__main__":
    main()
