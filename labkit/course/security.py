"""Security, seen from inside: capabilities decoded, escape attempts tried in each configuration, and
what a shared kernel means (Dirty COW).

The attempts reuse the isolation probe (:mod:`labkit.agent.workloads`: mount, module, clock, /proc/sys,
the host's PID 1) and the launcher's chroot breakout (``action='escape'``), and add two of their own: a
device node with the numbers of the host's root disk, read once (``DISK_SH``), and a set-user-ID copy of
the shell left in the container's root for host users to find (``SUID_SH``, judged and removed by the
agent as an ordinary host user would meet it). Every cell of the result is something a process really
tried, with the kernel's answer as its reason. A configuration with ``"image": NAME`` runs in a container
root made from that image the way the engine makes one (layers under an upper dir in root's own store),
as ``docker run`` would.
"""
import re
import secrets

from .isolation import parse_probe, probe
from ..wire.arch import CAPS

# Two attempts of lab 08 that the probe above does not make, each harmless and undone at once.
# DISK_SH: make a device node with the numbers of the host's root disk ($1 = MAJOR:MINOR) and read one block
# from it (nothing is written). SUID_SH: leave a set-user-ID copy of its own shell at the top of its root,
# owned by its root; the host side then asks whether an ordinary host user could run it as the host's root
# (the agent's ``probe.setuid_left``), and removes it.
DISK_SH = r"""
k() { printf '%s=%s\n' "$1" "$2"; }
d=
for c in /tmp /dev /; do if mkdir "$c/.lk-disk-$$" 2>/dev/null; then d=$c/.lk-disk-$$; break; fi; done
if [ -z "$d" ]; then k disk nodir; exit 0; fi
if err=$(mknod "$d/disk" b "${1%:*}" "${1#*:}" 2>&1); then
  if err=$(dd if="$d/disk" of=/dev/null bs=512 count=1 2>&1); then k disk read; else k disk open; k why "$err"; fi
  rm -f "$d/disk"
else
  k disk mknod; k why "$err"
fi
rmdir "$d"
"""

SUID_SH = r"""
k() { printf '%s=%s\n' "$1" "$2"; }
f=/.lk-suid-$$
if err=$( { cp "$(readlink /proc/$$/exe 2>/dev/null || echo /bin/busybox)" "$f" && chown 0:0 "$f" && chmod 4755 "$f"; } 2>&1); then
  k suid "$f"
else
  rm -f "$f" 2>/dev/null; k suid refused; k why "$err"
fi
"""


ATTEMPTS = {
    "break out of its root (chroot ..)": None,
    "see the host's PID 1": "host PIDs",
    "mount in the host's mount table": "mount (host)",
    "write the host's /proc/sys": "write /proc/sys",
    "write the host's /sys": "write /sys",
    "set the host's clock": "set clock",
    "load a kernel module": "load module",
    "read a host disk (mknod)": "disk",
    "leave a setuid file for host users": "setuid",
}


def decode_caps(mask):
    """The capability names set in a CapEff/CapBnd hex mask (as /proc/<pid>/status prints it)."""
    value = int(mask, 16) if isinstance(mask, str) else int(mask)
    return [name for bit, name in enumerate(CAPS) if value >> bit & 1]


def escape_attempts(lab, rootfs, configs):
    """Try every attempt in every configuration {label: run_in options}; returns (DataFrame of
    'blocked'/'ESCAPED', DataFrame of reasons). Every configuration runs in ``rootfs`` unless it names an
    ``image`` (then in a container root of that image, made here and removed after)."""
    import pandas as pd
    ctx = lab.call("probe.context")
    disk = lab.call("probe.host_disk")
    table, why, roots = {}, {}, []
    try:
        for i, (label, opts) in enumerate(configs.items()):
            opts = dict(opts)
            image = opts.pop("image", None)
            if image:
                roots.append(lab.container_root(image, f"lk08-{i}-{secrets.token_hex(3)}"))
                opts["rootfs"] = roots[-1].merged
            else:
                opts["rootfs"] = rootfs
            opts.setdefault("root_mode", "pivot_root" if "mnt" in (opts.get("namespaces") or ()) else "chroot")
            _, cmp = probe(lab, label, opts, ctx)
            esc_opts = {k: v for k, v in opts.items() if k != "limits"}
            ns = esc_opts.pop("namespaces", ())
            rec = lab.run_in((), ns, action="escape", **esc_opts)
            view = rec.facts.get("view") or {}
            cmp["disk"] = _disk_attempt(lab, disk, ns, esc_opts)
            cmp["setuid"] = _setuid_attempt(lab, ns, esc_opts)
            col, reasons = {}, {}
            for attempt, key in ATTEMPTS.items():
                if key is None:
                    got = bool(view.get("escaped"))
                    reasons[attempt] = ("reached the host's files through '..' past its root" if got else
                                        f"chroot refused: {view['escape_error']}" if view.get("escape_error") else
                                        "'..' at its root leads back to its root: the host's files are out of reach")
                else:
                    got, reasons[attempt] = bool(cmp[key][0]), cmp[key][1]
                col[attempt] = "ESCAPED" if got else "blocked"
            table[label], why[label] = col, reasons
    finally:
        lab.call("probe.done", marker=ctx["marker"])
        for root in roots:
            root.remove()
    return pd.DataFrame(table), pd.DataFrame(why)


def _disk_attempt(lab, disk, ns, opts):
    """(1 if it read a block of the host's root disk through a node it made, else 0, the reason)."""
    if not disk["dev"]:
        return 0, "nothing to try: " + disk["why"]
    rec = lab.run_in(["/bin/busybox", "sh", "-c", DISK_SH, "disk", disk["dev"]], ns, look=False, **opts)
    f = parse_probe(rec.stdout)
    host = "" if disk["host_can_read"] else (f"; this machine refuses raw reads of its disk even to the host's "
                                            f"root ({disk['why']}), so nothing here can read it")
    if f.get("disk") == "read":
        return 1, f"made a node for the host's disk {disk['dev']} and read from it"
    if f.get("disk") == "open":
        return 0, f"made the node, but may not open it: {f.get('why', '?').split(': ')[-1]} (nodev)" + host
    if f.get("disk") == "mknod":
        return 0, f"mknod: {f.get('why', '?').split(': ')[-1]}" + host
    return 0, "no writable directory to make a node in"


def _setuid_attempt(lab, ns, opts):
    """(1 if an ordinary host user could run, as the host's root, a set-user-ID file it left, else 0, why)."""
    rec = lab.run_in(["/bin/busybox", "sh", "-c", SUID_SH], ns, look=False, **opts)
    f = parse_probe(rec.stdout)
    if f.get("suid", "refused") == "refused":
        return 0, f"could not leave one: {f.get('why', '?').strip().splitlines()[-1] if f.get('why') else '?'}"
    res = lab.call("probe.setuid_left", root=opts["rootfs"], name=f["suid"])
    return int(res["escaped"]), res["why"]


DIRTY_COW = {"cve": "CVE-2016-5195", "mainline_fix": (4, 8, 3), "introduced": (2, 6, 22),
             "what": "a race in the kernel's copy-on-write of private read-only memory mappings let an "
                     "unprivileged process write to files it could only read (e.g. /etc/passwd, setuid "
                     "binaries) and so become root"}


def kernel_tuple(release):
    nums = re.findall(r"\d+", str(release))[:3]
    return tuple(int(n) for n in nums) + (0,) * (3 - len(nums))


def dirty_cow_note(release):
    """What a kernel release says about Dirty COW: honest about backports (a version alone proves little)."""
    v = kernel_tuple(release)
    if v >= DIRTY_COW["mainline_fix"]:
        return f"{release}: newer than the mainline fix (4.8.3, October 2016): not affected"
    if v < DIRTY_COW["introduced"]:
        return f"{release}: older than the bug (2.6.22): not affected by this one"
    return (f"{release}: in the affected range unless the distribution backported the fix "
            "(Debian, Ubuntu and RHEL did for their kernels): check the distribution's advisory")
