"""The grading VM for real (TCG here): one boot saved, guests restored from it, attacked from inside as root.

Each restored guest is a real qemu; the tests drive its agent over the same virtio-serial socket the grader
uses and check from the host what a guest can and cannot reach.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from labkit.agent import vm, vmsandbox
from labkit.client.lab import Lab
from labkit.client.transport import UnixSocket
from labkit.wire.errors import InvalidSpec
from labkit.wire.protocol import vm_start_line

from conftest import REPO

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

UID = 2_090_123  # no account has it


def ours_running():
    """The command lines of labkit's qemu processes (in full: ps would cut them at 80 columns)."""
    return subprocess.run(["pgrep", "-af", "labkit-vm-"], capture_output=True, text=True).stdout.splitlines()


class Guest:
    """A restored grading guest and a Lab on its agent, stopped on exit."""

    def __init__(self, uid=UID, **kw):
        self.info = vmsandbox.restore(uid, **kw)
        try:
            self.lab = Lab(UnixSocket(self.info["socket"], preamble=vm_start_line()), "grading VM")
        except BaseException:
            vmsandbox.stop(self.info["id"])
            raise

    def qemu_pid(self):
        return next(int(e["pid"]) for e in vm.list_vms() if e["id"] == self.info["id"])

    def sh(self, script, timeout=120):
        return self.lab.run(["sh", "-c", script], timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lab.close()
        vmsandbox.stop(self.info["id"])


def test_one_boot_is_saved_and_then_reused():
    os.makedirs(f"{vmsandbox.SNAPSHOTS}/.build-1-dead00", exist_ok=True)  # what a grader killed mid-boot leaves
    with open(f"{vmsandbox.SNAPSHOTS}/.build-1-dead00/state", "wb") as f:
        f.write(b"x" * 4096)
    first = vmsandbox.snapshot()
    assert first["accel"] in ("kvm", "tcg") and first["accel_reason"], "the accelerator is labelled"
    again = vmsandbox.snapshot()
    assert again["key"] == first["key"] and again["made"] == first["made"], "the saved boot is reused, not redone"
    assert vmsandbox.snapshots() == [first["key"]], "one snapshot on disk, and the killed build's files are gone"
    print(f"\ngrading VM snapshot: boot {first['boot_s']} s, save {first['save_s']} s, "
          f"{first['bytes'] >> 20} MiB ({first['accel'].upper()})")


def test_a_restored_guest_is_its_own_kernel_with_the_real_time_and_is_gone_after():
    with Guest() as g:
        assert g.info["restore_s"] < 30
        out = g.sh("uname -r; cat /sys/fs/cgroup/cgroup.controllers; hostname; date +%s; ls /sys/class/net").stdout.split("\n")
        assert out[0] == os.path.basename(vm.find_kernel())[len("vmlinuz-"):] != os.uname().release
        assert "memory" in out[1] and "pids" in out[1], "pure cgroup v2, as on the lab VM"
        assert out[2] == "labkit-grade" and out[4:] == ["lo", ""], "no network but loopback"
        assert abs(int(out[3]) - time.time()) < 30, "the guest's clock was set from the grader's, not the snapshot's"
        assert "grading VM" in g.lab.call("vm.missing")["reason"], "a VM question there says why it cannot run"
        pid = g.qemu_pid()
        status = open(f"/proc/{pid}/status").read()
        assert re.search(rf"^Uid:\s+{UID}\s+{UID}\s+{UID}\s+{UID}$", status, re.M), "qemu runs as the given user"
        assert re.search(r"^Seccomp:\s+2$", status, re.M), "under its seccomp filter"
        assert re.search(r"^CapEff:\s+0+$", status, re.M), "with no capability"
        assert os.readlink(f"/proc/{pid}/root") == f"{vm.VM_RUN}/{g.info['id']}/root", "chrooted into an empty directory"
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net"), "in a network namespace of its own"
        assert re.search(rf"^Max file size\s+{vmsandbox.LOG_LIMIT}\s", open(f"/proc/{pid}/limits").read(), re.M)
    assert not os.path.exists(f"/proc/{pid}") and not any(g.info["id"] in p for p in ours_running())
    assert not os.path.exists(f"{vm.VM_RUN}/{g.info['id']}"), "its socket directory is gone"


def test_two_guests_share_nothing_not_even_their_random_numbers():
    with Guest() as a, Guest(uid=UID + 1) as b:
        a.sh("echo mine > /root/a.txt")
        assert b.sh("cat /root/a.txt").exit_code != 0, "one guest's files are not another's"
        ua, ub = (g.sh("cat /proc/sys/kernel/random/uuid").stdout for g in (a, b))
        assert ua != ub, "each restored guest's random generator was reseeded (else both would draw the same)"
    with Guest() as c:
        assert c.sh("cat /root/a.txt").exit_code != 0, "and a new guest starts from the snapshot, empty"


def test_root_in_the_guest_wipes_only_the_guest():
    sentinel = os.path.join(REPO, "README.md")
    with Guest() as g:
        labs = g.lab.run(["sh", "-c", "unshare --mount --pid --fork true && echo ok"])
        assert labs.stdout.strip() == "ok", "root in the guest has namespaces to teach with"
        g.lab.run(["rm", "-rf", "--no-preserve-root", "/"], timeout=300)
        assert os.path.exists(sentinel) and os.path.exists(sys.executable)
    assert os.path.exists(sentinel)
    assert not any(g.info["id"] in p for p in ours_running())


def test_a_killed_graders_guest_is_removed_by_cleanup(lab):
    """A grader that dies without stopping its guest leaves a recorded entry: `labkit cleanup` kills that qemu."""
    code = (f"from labkit.agent import vmsandbox; r = vmsandbox.restore({UID}); print(r['id'], flush=True); "
            "import os; os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    vm_id = out.stdout.split()[-1]
    assert any(f"labkit-vm-{vm_id}" in p for p in ours_running()), "its qemu outlived the grader"
    assert f"vm {vm_id}" in lab.cleanup(dry_run=True).facts["found"]
    assert f"vm {vm_id}" in lab.cleanup()["removed"]
    assert not ours_running(), "no grading qemu is left"


def test_bad_restore_requests_say_what_to_do():
    with pytest.raises(InvalidSpec, match="unprivileged user id"):
        vmsandbox.restore(uid=0)
    with pytest.raises(InvalidSpec, match="256..16384"):
        vmsandbox.snapshot(memory_mb=16)
    with pytest.raises(InvalidSpec, match="id"):
        vmsandbox.stop("../../etc")
