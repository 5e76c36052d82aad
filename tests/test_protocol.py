"""The JSON-lines protocol and typed errors crossing it."""
import pytest

from labkit import errors, protocol
from labkit.agent import server


def test_roundtrip_and_framing():
    line = protocol.encode({"id": 1, "method": "x", "params": {"a": (1, 2)}})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line) == {"id": 1, "method": "x", "params": {"a": [1, 2]}}


def test_garbage_is_a_protocol_error_with_a_fix():
    with pytest.raises(errors.ProtocolError) as err:
        protocol.decode(b"Welcome to Ubuntu!\n")
    assert "shell rc" in err.value.fix
    with pytest.raises(errors.ProtocolError):
        protocol.decode(b"[1, 2]")


def test_old_agent_is_refused():
    with pytest.raises(errors.AgentTooOld) as err:
        protocol.check_hello({"hello": protocol.HELLO, "protocol": 0, "version": "0.0.1"})
    assert "update" in err.value.fix
    with pytest.raises(errors.ProtocolError):
        protocol.check_hello({"hello": "something else"})


def test_errors_keep_their_type_and_fix_over_the_wire():
    e = errors.InvalidSpec("bad thing", fix="do this")
    back = errors.from_wire(protocol.decode(protocol.encode(e.to_wire())))
    assert type(back) is errors.InvalidSpec and back.fix == "do this" and "bad thing" in str(back)
    c = errors.from_wire(errors.CommandFailed(["false"], 1, "boom").to_wire())
    assert isinstance(c, errors.CommandFailed) and c.exit_code == 1 and c.argv == ["false"]
    assert type(errors.from_wire({"type": "SomethingNew", "message": "m"})) is errors.LabkitError


def test_every_error_is_a_labkit_error():
    for cls in errors._BY_NAME.values():
        assert issubclass(cls, errors.LabkitError)


def test_server_answers_every_request_and_never_raises():
    assert server.handle({"id": 3, "method": "nope"})["error"]["type"] == "InvalidSpec"
    assert server.handle({"id": 4, "method": "hello"})["result"]["protocol"] == protocol.PROTOCOL
    bad = server.handle({"id": 5, "method": "rootfs.list", "params": {"surprise": 1}})
    assert bad["ok"] is False and bad["error"]["type"] == "InvalidSpec"
    assert server.handle("not a dict")["ok"] is False
