"""The JSON-lines protocol and typed errors crossing it."""
import pytest

from labkit.wire import errors, protocol
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
    c = errors.from_wire(protocol.decode(protocol.encode(errors.CommandFailed(["false"], 1, "boom", "out").to_wire())))
    assert isinstance(c, errors.CommandFailed) and c.exit_code == 1 and c.argv == ["false"]
    assert (c.stdout, c.stderr) == ("out", "boom"), "the command's output crosses the wire with its failure"
    big = errors.CommandFailed(["yes"], 1, stdout="y\n" * 100000)
    assert len(big.stdout) == errors.CommandFailed.WIRE_TAIL and big.stdout.endswith("y\n")
    assert len(protocol.encode(big.to_wire())) < 3 * errors.CommandFailed.WIRE_TAIL
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


# -- attacks on the wire: every line is hostile until checked (the agent is root) -------------------------
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from labkit.client import transport as T  # noqa: E402


def _nested(depth):
    """A Python list nested ``depth`` deep, built without recursion."""
    top = cur = []
    for _ in range(depth - 1):
        cur.append([])
        cur = cur[0]
    return top


def test_a_deeply_nested_line_is_refused_and_names_who_sent_it():
    attack = b"[" * 200000 + b"\n"
    with pytest.raises(errors.ProtocolError) as err:
        protocol.decode(attack, sender="client")
    assert "the client sent" in err.value.message and "nest" in err.value.message
    assert str(protocol.MAX_DEPTH) in err.value.fix
    with pytest.raises(errors.ProtocolError) as err:
        protocol.decode(attack, sender="agent")
    assert "the agent sent" in err.value.message and "update labkit" in err.value.fix
    # nesting Python's parser copes with, but deeper than the protocol allows, is refused the same way
    just_over = json.dumps({"params": _nested(protocol.MAX_DEPTH)})
    with pytest.raises(errors.ProtocolError, match="nest more than"):
        protocol.decode(just_over, sender="client")
    assert protocol.decode(json.dumps({"p": _nested(protocol.MAX_DEPTH - 1)}), sender="client")


def test_bad_json_says_who_sent_it_and_what_to_do():
    with pytest.raises(errors.ProtocolError) as err:
        protocol.decode(b"rm -rf /\n", sender="client")
    assert "the client sent a line that is not JSON" in err.value.message and "labkit.connect" in err.value.fix
    with pytest.raises(errors.ProtocolError) as err:
        protocol.decode(b"Welcome to Ubuntu!\n", sender="agent")
    assert "the agent sent" in err.value.message and "shell rc" in err.value.fix


def test_what_cannot_go_on_the_wire_is_refused_before_it_leaves(monkeypatch):
    with pytest.raises(errors.ProtocolError) as err:
        protocol.encode({"params": _nested(200000)}, sender="client")
    assert "the client tried to send" in err.value.message and err.value.fix
    with pytest.raises(errors.ProtocolError, match="not JSON data"):
        protocol.encode({"params": {"x": object()}}, sender="client")
    monkeypatch.setattr(protocol, "MAX_LINE", 1 << 20)
    with pytest.raises(errors.ProtocolError) as err:
        protocol.encode({"text": "x" * (2 << 20)}, sender="agent")
    assert "the agent tried to send a line of" in err.value.message and "ask for less" in err.value.fix
    with pytest.raises(errors.ProtocolError, match="more than the protocol's limit"):
        protocol.decode(b"{}" + b" " * (2 << 20), sender="agent")


def _serve(lines):
    """Run the agent's loop over ``lines`` (bytes, as the client's stdin); its answers after the hello."""
    out = io.BytesIO()
    server.serve(io.BytesIO(b"".join(lines)), out)
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert answers[0]["hello"] == protocol.HELLO
    return answers[1:]


def test_the_agent_survives_hostile_lines_and_answers_the_next(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_LINE", 1 << 20)  # the real bound is 64 MiB (tests/test_agent.py sends that)
    attacks = [
        b"[" * 200000 + b"\n",                                    # RecursionError in json, formerly fatal
        b"{\"id\": 1, \"params\": " + b"[" * 150 + b"]" * 150 + b"}\n",  # parses, but deeper than MAX_DEPTH
        b"GET / HTTP/1.1\n",                                      # not JSON
        b"[1, 2]\n",                                              # JSON, not an object
        b"x" * (3 << 20) + b"\n",                                  # longer than the bound
        b"{\"id\": 6, \"method\": [\"hello\"]}\n",                   # an unhashable method name
    ]
    answers = _serve(attacks + [b"\n", b"{\"id\": 7, \"method\": \"hello\"}\n"])
    assert len(answers) == len(attacks) + 1
    for answer in answers[:5]:
        assert answer["ok"] is False and answer["id"] is None and answer["error"]["type"] == "ProtocolError"
        assert answer["error"]["message"].startswith("the client sent") and answer["error"]["fix"]
    assert "nest" in answers[0]["error"]["message"] and "nest" in answers[1]["error"]["message"]
    assert f"{(3 << 20) + 1} bytes" in answers[4]["error"]["message"]
    assert answers[5]["error"]["type"] == "InvalidSpec" and "no method" in answers[5]["error"]["message"]
    assert answers[6] == {"id": 7, "ok": True, "result": answers[6]["result"]}
    assert answers[6]["result"]["hello"] == protocol.HELLO


def test_an_answer_too_big_for_the_wire_becomes_an_error_for_that_request(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_LINE", 1 << 20)
    line = server.encode_answer(protocol.response(9, result={"text": "x" * (2 << 20)}))
    answer = protocol.decode(line, sender="agent")
    assert answer["id"] == 9 and answer["ok"] is False
    assert answer["error"]["type"] == "ProtocolError" and "the agent tried to send" in answer["error"]["message"]
    deep = protocol.decode(server.encode_answer(protocol.response(10, result=_nested(5000))), sender="agent")
    assert deep["id"] == 10 and "nest" in deep["error"]["message"]


def test_request_timeouts_are_generous_and_follow_the_request():
    assert protocol.request_timeout("doctor", {}) == protocol.DEFAULT_TIMEOUT
    assert protocol.request_timeout("vm.boot", {}) == protocol.SLOW_TIMEOUT
    assert protocol.request_timeout("bench.native", {"workload": "cpu"}) == protocol.SLOW_TIMEOUT
    assert protocol.request_timeout("run", {"timeout": 5000}) == 5000 + protocol.TIMEOUT_GRACE
    assert protocol.request_timeout("cgroup.sample", {"seconds": 900}) == 900 + protocol.TIMEOUT_GRACE
    assert protocol.request_timeout("run", {"timeout": "soon"}, base=30) == 30
    assert protocol.request_timeout("vm.bootleg", {}) == protocol.SLOW_TIMEOUT  # the vm.* family


# A stand-in agent that misbehaves on purpose: it says hello, then answers every request but 'attack'
# (and holds 'hang' until the next request arrives, then answers both in order).
FAKE_AGENT = r'''
import json, sys
mode = sys.argv[1]
out = sys.stdout.buffer
def send(obj):
    out.write((json.dumps(obj) + "\n").encode())
    out.flush()
if mode == "silent":
    sys.stdin.read()
    sys.exit()
send({"hello": "labkit-agent", "protocol": %d, "version": "fake", "pid": 0})
held = []
for raw in sys.stdin.buffer:
    req = json.loads(raw)
    if req["method"] == "hang":
        held.append(req["id"])
        continue
    for h in held:
        if mode == "hang-garbled":
            out.write(b"[" * 200000 + b"\n")
        else:
            send({"id": h, "ok": True, "result": "late"})
    held = []
    if req["method"] == "attack":
        if mode == "deep":
            out.write(b"[" * 200000 + b"\n")
        elif mode == "banner":
            out.write(b"Welcome to Ubuntu!\n")
        elif mode == "long":
            out.write(b"x" * (int(sys.argv[2]) * 4))
        elif mode == "wrong-id":
            send({"id": 12345, "ok": True, "result": None})
        out.flush()
        continue
    send({"id": req["id"], "ok": True, "result": {"echo": req["params"]}})
'''


@pytest.fixture
def fake_agent(tmp_path):
    script = tmp_path / "fake_agent.py"
    script.write_text(FAKE_AGENT.replace("%d", str(protocol.PROTOCOL)))
    made = []

    def start(mode, *args):
        t = T.Subprocess([sys.executable, str(script), mode, *map(str, args)], name="fake")
        made.append(t)
        return t
    yield start
    for t in made:
        t.close()


@pytest.mark.parametrize("mode, words", [("deep", "nest"), ("banner", "not JSON")])
def test_a_bad_answer_is_the_agents_fault_and_the_client_goes_on(fake_agent, mode, words):
    t = fake_agent(mode)
    with pytest.raises(errors.ProtocolError) as err:
        t.call("attack")
    assert err.value.message.startswith("the agent sent") and words in err.value.message and err.value.fix
    assert t.call("echo", x=1) == {"echo": {"x": 1}}   # the line was whole: the stream is still in step


def test_an_endless_answer_is_refused_without_holding_it_all(fake_agent, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_LINE", 1 << 20)
    t = fake_agent("long", protocol.MAX_LINE)
    with pytest.raises(errors.ProtocolError) as err:
        t.call("attack")
    assert "the agent sent a line longer than" in err.value.message and "ask for less" in err.value.fix
    assert len(t._reader._buf) <= protocol.MAX_LINE + t._reader.CHUNK
    with pytest.raises(errors.TransportError, match="was closed") as err:
        t.call("echo")                                       # out of step: closed, never misread
    assert "reconnect" in err.value.fix


def test_an_answer_to_another_request_is_refused(fake_agent):
    t = fake_agent("wrong-id")
    with pytest.raises(errors.ProtocolError, match="answered request 12345"):
        t.call("attack")


@pytest.mark.parametrize("mode", ["hang", "hang-garbled"])
def test_a_request_that_runs_out_of_time_says_what_to_do_and_the_late_answer_is_dropped(fake_agent, mode):
    t = fake_agent(mode)
    with pytest.raises(errors.TransportError) as err:
        t.call("hang", _timeout=0.2)
    assert "did not answer 'hang' within 0.2 s" in err.value.message
    assert "_timeout=" in err.value.fix and "LABKIT_TIMEOUT" in err.value.fix
    # the agent answers 'hang' late (well formed or not), just before 'echo': the client drops it and gets
    # echo's own answer
    assert t.call("echo", n=2) == {"echo": {"n": 2}}         # _timeout is the client's, never sent
    assert t.call("echo", n=3, _timeout=30) == {"echo": {"n": 3}}


def test_timeouts_are_configurable_and_checked(fake_agent, monkeypatch):
    t = fake_agent("hang")
    with pytest.raises(errors.InvalidSpec, match="not a number of seconds"):
        t.call("echo", _timeout="soon")
    t.timeout = 0.2
    with pytest.raises(errors.TransportError, match="within 0.2 s"):
        t.call("hang")
    t.timeout = None
    monkeypatch.setenv("LABKIT_TIMEOUT", "0.2")
    with pytest.raises(errors.TransportError, match="within 0.2 s"):
        t.call("hang")
    monkeypatch.setenv("LABKIT_TIMEOUT", "forever")
    with pytest.raises(errors.InvalidSpec, match="LABKIT_TIMEOUT"):
        t.call("echo")
    monkeypatch.delenv("LABKIT_TIMEOUT")
    assert t.call("echo", n=4) == {"echo": {"n": 4}}


def test_an_agent_that_never_says_hello_is_given_up_on(fake_agent, monkeypatch):
    monkeypatch.setattr(protocol, "HELLO_TIMEOUT", 0.2)
    with pytest.raises(errors.TransportError) as err:
        fake_agent("silent")
    assert "said nothing within 0.2 s" in err.value.message


def test_an_id_too_big_to_echo_does_not_end_the_loop(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_LINE", 1 << 20)
    big_id = json.dumps({"id": "i" * ((1 << 20) - 100), "method": "hello"}).encode() + b"\n"
    answers = _serve([big_id, b'{"id": 2, "method": "hello"}\n'])
    assert answers[0]["id"] is None and "the agent tried to send" in answers[0]["error"]["message"]
    assert answers[1]["id"] == 2 and answers[1]["ok"] is True
