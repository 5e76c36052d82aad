"""Security, seen from inside: capabilities decoded, escape attempts tried in each configuration, and
what a shared kernel means (Dirty COW).

The attempts reuse the isolation probe (:mod:`labkit.agent.workloads`: mount, module, clock, /proc/sys,
the host's PID 1) and the launcher's chroot breakout (``action='escape'``); every cell of the result is
something a process really tried, with the kernel's answer as its reason.
"""
import re

from .isolation import probe
from .specs import CAPS

ATTEMPTS = {
    "break out of its root (chroot ..)": None,
    "see the host's PID 1": "host PIDs",
    "mount in the host's mount table": "mount (host)",
    "write the host's /proc/sys": "write /proc/sys",
    "write the host's /sys": "write /sys",
    "set the host's clock": "set clock",
    "load a kernel module": "load module",
}


def decode_caps(mask):
    """The capability names set in a CapEff/CapBnd hex mask (as /proc/<pid>/status prints it)."""
    value = int(mask, 16) if isinstance(mask, str) else int(mask)
    return [name for bit, name in enumerate(CAPS) if value >> bit & 1]


def escape_attempts(lab, rootfs, configs):
    """Try every attempt in every configuration {label: run_in options}; returns (DataFrame of
    'blocked'/'ESCAPED', DataFrame of reasons). Every configuration needs ``rootfs`` (set here)."""
    import pandas as pd
    ctx = lab.call("probe.context")
    table, why = {}, {}
    try:
        for label, opts in configs.items():
            opts = dict(opts, rootfs=rootfs)
            opts.setdefault("root_mode", "pivot_root" if "mnt" in (opts.get("namespaces") or ()) else "chroot")
            _, cmp = probe(lab, label, opts, ctx)
            esc_opts = {k: v for k, v in opts.items() if k != "limits"}
            ns = esc_opts.pop("namespaces", ())
            rec = lab.run_in((), ns, action="escape", **esc_opts)
            view = rec.facts.get("view") or {}
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
    return pd.DataFrame(table), pd.DataFrame(why)


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
