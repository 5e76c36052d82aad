"""The grader's relay: a real agent behind it, a real client in front, and the journal that tells a real
record from a forged one."""
import json
import os
import socket
import subprocess
import sys

import pytest

import labkit
from labkit.client.records import Record, record_digest
from labkit.course.relay import Relay
from labkit.wire import protocol
from labkit.wire.errors import InvalidSpec, TransportError

pytestmark = pytest.mark.privileged


@pytest.fixture
def relay(tmp_path, lab):
    d = tmp_path / "sandbox"
    d.mkdir(mode=0o700)
    with Relay(lab.transport, str(d / "relay.sock")) as r:
        yield r


def test_a_client_reaches_the_agent_through_the_relay_and_every_answer_is_kept(relay):
    with labkit.connect("unix://" + relay.path) as student:
        assert student.info["hello"] == protocol.HELLO and student.info["euid"] == 0
        rec = student.chroot(student.rootfs("t-relay"), ["sh", "-c", "echo hi"])
        assert rec.exit_code == 0 and "hi" in rec.stdout
        with pytest.raises(InvalidSpec):  # refused by the agent, and the refusal comes back as itself
            student.call("proc.run", spec={"argv": ["true"], "rootfs": "/etc"})
        student.rootfs("t-relay").remove()
    methods = [e["method"] for e in relay.journal]
    assert methods[:2] == ["rootfs.create", "proc.run"]
    [refused] = [e for e in relay.journal if not e["ok"]]
    assert refused["method"] == "proc.run" and refused["error"]["type"] == "InvalidSpec"
    found = relay.lookup(record_digest(rec))
    assert found is not None and found["steps"] == rec["steps"], "the record the kernel holds is the agent's"


def test_a_hand_made_or_edited_record_is_not_in_the_journal(relay):
    with labkit.connect("unix://" + relay.path) as student:
        real = student.chroot(student.rootfs("t-relay"), ["sh", "-c", "echo hi > /hello.txt"])
        student.rootfs("t-relay").remove()
    edited = json.loads(json.dumps(real))
    edited["steps"].append({"kind": "syscall", "call": "chroot", "args": ["/"], "result": 0})
    forged = Record(steps=[{"kind": "syscall", "call": "chroot", "args": ["/x"], "result": 0}], facts={})
    assert relay.lookup(record_digest(real)) is not None
    assert relay.lookup(record_digest(edited)) is None and relay.lookup(record_digest(forged)) is None
    assert relay.lookup(None) is None and record_digest(Record()) is None


def test_hostile_lines_get_an_error_and_the_relay_goes_on(relay):
    s = socket.socket(socket.AF_UNIX)
    s.connect(relay.path)
    f = s.makefile("rwb", buffering=0)
    assert json.loads(f.readline())["hello"] == protocol.HELLO
    for bad in (b"not json\n", b"[" * 5000 + b"\n", b'{"id": 1, "method": 7}\n', b'"just a string"\n'):
        f.write(bad)
        answer = json.loads(f.readline())
        assert answer["ok"] is False and answer["error"]["type"] == "ProtocolError", answer
    f.write(json.dumps({"id": 9, "method": "host_ns", "params": {}}).encode() + b"\n")
    answer = json.loads(f.readline())
    assert answer["id"] == 9 and answer["ok"] is True
    s.close()
    with labkit.connect("unix://" + relay.path) as again:  # the relay serves the next connection
        assert again.host_namespaces()


def test_only_the_sandbox_user_may_connect(lab):
    """The socket is 0600 and owned by the user it is for: another user on the machine is refused."""
    import pathlib
    import pwd
    import shutil
    import tempfile
    d = pathlib.Path(tempfile.mkdtemp(prefix="lk-relay-"))  # a directory every user may pass through
    os.chmod(d, 0o711)
    try:
        _only_the_owner(lab, d, pwd.getpwnam("nobody").pw_uid)
    finally:
        shutil.rmtree(d)


def _only_the_owner(lab, d, nobody):
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e: print(e.errno)")
    with Relay(lab.transport, str(d / "relay.sock"), owner=nobody) as r:
        st = os.stat(r.path)
        assert st.st_mode & 0o777 == 0o600 and st.st_uid == nobody
        as_nobody = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", code, r.path],
                                   capture_output=True, text=True)
        assert as_nobody.stdout.strip() == "connected", as_nobody.stderr
        as_other = subprocess.run(["runuser", "-u", "daemon", "--", sys.executable, "-c", code, r.path],
                                  capture_output=True, text=True)
        assert as_other.stdout.strip() == "13", "EACCES for everyone else"
    assert not os.path.exists(d / "relay.sock"), "closing removes the socket"
    with pytest.raises(TransportError, match="cannot connect"):
        labkit.connect("unix://" + str(d / "relay.sock"))


def test_no_request_through_the_relay_holds_the_grader_past_its_limit(tmp_path, lab):
    """The grader's own checks share the channel: a student's request may not ask for a longer wait."""
    d = tmp_path / "sandbox"
    d.mkdir(mode=0o700)
    with Relay(lab.transport, str(d / "relay.sock"), max_seconds=2) as relay:
        from labkit.wire.errors import LabkitError
        with labkit.connect("unix://" + relay.path) as student:
            try:
                rec = student.run(["sleep", "30"], timeout=100000)
            except LabkitError:
                rec = None
        [entry] = [e for e in relay.journal if e["method"] == "run"]
        assert entry["params"]["timeout"] == 2 and "_timeout" not in entry["params"], entry["params"]
        assert rec is None or rec.exit_code != 0, "the sleep was cut short at the grader's limit"


def test_a_submission_that_answers_without_end_is_cut_off_and_the_grader_keeps_its_memory(relay, monkeypatch):
    """Root on a hostile agent (or a loop of big outputs) could fill the grader's journal: past MAX_JOURNAL
    (made small here, 256 MiB for real) the relay refuses every request, and keeps no more."""
    from labkit.course import relay as relay_mod
    from labkit.wire.errors import LabkitError
    monkeypatch.setattr(relay_mod, "MAX_JOURNAL", 200_000)
    with labkit.connect("unix://" + relay.path) as student:
        for _ in range(4):
            assert len(student.run(["sh", "-c", "head -c 60000 /dev/zero | tr '\\0' x"]).stdout) == 60000
        with pytest.raises(LabkitError, match="relays no more"):
            student.run(["sh", "-c", "head -c 60000 /dev/zero | tr '\\0' x"])
        with pytest.raises(LabkitError, match="relays no more"):
            student.run(["true"])
    assert 200_000 < relay.journal_bytes < 200_000 + 70_000 and len(relay.journal) == 4
