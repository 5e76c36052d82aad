"""Published comparisons and the lecture's claims, set beside the figures of this run.

``published_table(result)`` puts a run of :mod:`labkit.course.bench` next to what two well-known studies
report; ``lecture_points(result, boot_ids)`` takes the lecture's "when containers / when VMs" lists
and says, for each point, what this run measured for or against it. The published entries are
summaries of the papers' findings in our words (with their direction and, where the paper states one
plainly, its figure); read the papers for their exact set-ups.
"""

SOURCES = {
    "Felter et al.": "W. Felter, A. Ferreira, R. Rajamony, J. Rubio: An Updated Performance Comparison of "
                     "Virtual Machines and Linux Containers. IBM Research Report RC25482 (2014); ISPASS 2015. "
                     "Docker vs KVM vs native on the same two-socket server.",
    "Firecracker": "A. Agache et al.: Firecracker: Lightweight Virtualization for Serverless Applications. "
                   "NSDI 2020. KVM microVMs with a minimal device model.",
}

# measure in this run -> (what Felter et al. found for Docker, for KVM; what Firecracker reports)
PUBLISHED = {
    "cpu": ("same as native (Linpack, PXZ)", "close to native once the guest sees the host's CPU model; "
            "slower before tuning", ""),
    "memory": ("same as native (STREAM)", "same as native (STREAM)", ""),
    "fileio": ("same as native (fio, on a volume)", "random I/O markedly slower through QEMU's virtual disk", ""),
    "net-throughput": ("line rate, more CPU per byte through NAT", "line rate, more CPU per byte", ""),
    "net-latency": ("NAT and the bridge add a few µs per round trip", "more added latency than Docker's NAT", ""),
    "startup": ("", "", "about 125 ms from launch to the guest's user space"),
    "density": ("", "", "under 5 MiB of memory overhead per microVM"),
}


def _this_run(result):
    s = result.summary()
    r = result.ratios()
    vm = result.accel_label()
    out = {}
    for exp in PUBLISHED:
        if exp == "startup":
            _, rows = result.medians("startup", s)
            if "labkit" in rows and vm in rows:
                out[exp] = (f"labkit {rows['labkit']:.1f} ms", f"{vm} {rows[vm]:.0f} ms to /init")
        elif exp == "density":
            last, rows = result.medians("density", s)
            if last:
                out[exp] = (f"{rows.get('container', float('nan')):.2f} MiB PSS each ({last})",
                            f"{rows.get(vm, float('nan')):.0f} MiB PSS each ({last})")
        elif exp in r.index:
            row = r.loc[exp]
            vals = [row.get(c) for c in ("container", "container (bridge)") if c in row and row.get(c) == row.get(c)]
            box = vals[0] if vals else None
            out[exp] = (f"{box:.2f}× native time" if box is not None else "-",
                        f"{row.get(vm):.2f}× native time" if vm in row and row.get(vm) == row.get(vm) else "-")
    return out


def published_table(result):
    """A DataFrame: per measure, the papers' findings and this run's figures (VM labelled with its accel)."""
    import pandas as pd
    mine = _this_run(result)
    missing = result.env.get("vm_missing")
    rows = []
    for exp, (docker, kvm, fc) in PUBLISHED.items():
        box, vm = mine.get(exp, ("-", "-"))
        rows.append({"measure": exp, "Felter et al.: Docker": docker or "-", "Felter et al.: KVM": kvm or "-",
                     "Firecracker (KVM microVM)": fc or "-", "this run: container": box,
                     f"this run: {result.accel_label()}": f"no VM on this target: {missing}" if missing else vm})
    return pd.DataFrame(rows).set_index("measure")


def lecture_points(result, boot_ids=None):
    """The lecture's lists, each point with this run's evidence and a verdict (backed / questioned / not
    measured here). ``boot_ids``: {'host', 'container', 'vm'} kernel boot ids, as lab 07 reads them."""
    import pandas as pd
    s = result.summary()
    vm = result.accel_label()
    tcg = "TCG" in vm
    _, start = result.medians("startup", s)
    last, d = result.medians("density", s)
    r = result.ratios()
    rows = []

    def add(side, point, evidence, verdict):
        rows.append({"favours": side, "lecture's point": point, "this run": evidence, "verdict": verdict})

    missing = result.env.get("vm_missing")
    if missing:
        add("both", "every point that compares with a VM", f"no VM could be measured on this target: {missing}",
            "not decidable here")

    if "labkit" in start and vm in start:
        add("containers", "many small services, started and stopped often (microservices)",
            f"a container starts in {start['labkit']:.0f} ms, the VM boots to /init in {start[vm]:.0f} ms "
            f"({start[vm] / start['labkit']:.0f}×)", "backed" + (" (a KVM boot is faster than TCG's, still far slower)"
                                                                  if tcg else ""))
    if last and "container" in d and vm in d:
        add("containers", "fewer servers for the same applications",
            f"idle: {d['container']:.2f} MiB per container vs {d[vm]:.0f} MiB per VM ({last}): "
            f"{d[vm] / d['container']:.0f}× more instances fit in the same memory", "backed")
    if "cpu" in r.index and "container" in r.columns:
        c = r.loc["cpu", "container"]
        add("containers", "the development environment matches production",
            f"the same image runs at {c:.2f}× native CPU time: no performance surprise between laptop and server",
            "backed" if abs(c - 1) < 0.1 else "questioned")
        add("containers", "cloud-native applications (scale out by adding instances)",
            "start-up and density above decide how fast and how far one can scale out", "backed by the two rows above")
    if boot_ids and boot_ids.get("vm"):
        same = boot_ids.get("container") == boot_ids.get("host")
        own = boot_ids.get("vm") not in (None, boot_ids.get("host"))
        add("VMs", "an application that needs another operating system (or another kernel)",
            f"the container's kernel is the host's (boot id {str(boot_ids.get('container'))[:8]}"
            f"{' = host' if same else ' ≠ host?'}); the VM's is its own ({str(boot_ids.get('vm'))[:8]})",
            "backed" if same and own else "questioned")
    add("VMs", "an application that needs many operating-system features (modules, clock, its own kernel settings)",
        "lab 08: inside the VM root may load modules and set the clock of its own kernel; a container may not "
        "touch the host's without giving up isolation", "backed (lab 08)")
    if "fileio" in r.index and vm in r.columns:
        add("VMs", "storage tied to the platform (a virtual disk of its own)",
            f"writes to the VM's virtual disk took {r.loc['fileio', vm]:.1f}× native time"
            + (" under TCG" if tcg else ""), "the VM gets a disk of its own, at a cost")
    add("VMs", "a monolith that grows by adding memory and CPUs to one machine",
        f"CPU-bound work in the VM: {r.loc['cpu', vm]:.1f}× native time" if "cpu" in r.index and vm in r.columns
        else "not measured", "not decidable here: under TCG every instruction is emulated; with KVM the published "
        "figures put a tuned guest close to native" if tcg else "not decidable here" if missing
        else "backed if the ratio is close to 1")
    return pd.DataFrame(rows)
