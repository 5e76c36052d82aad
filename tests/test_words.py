"""labkit.wire.words: Docker's words for states, signals and detach keys, the same for the CLI and the API."""
import signal

import pytest

from labkit.wire.words import Detach, ago, container_status, detach_keys, signal_number


def test_signals_are_taken_as_docker_kill_takes_them():
    assert signal_number("9") == signal_number("KILL") == signal_number("sigkill") == signal.SIGKILL
    for bad in ("NOPE", "99999", "", "-1"):
        with pytest.raises(ValueError):
            signal_number(bad)


def test_ago_and_status_read_as_docker_ps():
    assert ago(100, now=100.2) == "Less than a second" and ago(0, now=90) == "About a minute"
    assert ago(0, now=7200) == "2 hours" and ago(0, now=3600) == "About an hour"
    assert container_status({"state": "created"}) == "Created"


def test_detach_keys_in_dockers_format():
    assert detach_keys() == b"\x10\x11"  # ctrl-p,ctrl-q
    assert detach_keys("ctrl-a,x") == b"\x01x" and detach_keys("ctrl-@,ctrl-[,ctrl-_") == b"\x00\x1b\x1f"
    assert detach_keys("CTRL-P,ctrl-q") == b"\x10\x11" and detach_keys("ctrl-\\\\") == b"\x1c"
    assert detach_keys("1,.") == b"1."  # one character, as Docker takes it
    for bad in ("", "ctrl-", "ctrl-1", "ab", "ctrl-p,,x", "é", " ", ",".join("a" * 17)):
        with pytest.raises(ValueError, match="ctrl-p,ctrl-q|16 keys"):
            detach_keys(bad)


def test_detach_passes_on_what_is_not_the_sequence_and_stops_at_it():
    d = Detach()
    assert d.feed(b"ls -l\n") == (b"ls -l\n", False)
    assert d.feed(b"a\x10") == (b"a", False), "the sequence's start is held back"
    assert d.feed(b"b") == (b"\x10b", False), "and passed on when the next key is not the sequence's"
    assert d.feed(b"\x10\x10") == (b"\x10", False)
    assert d.feed(b"\x11after") == (b"", True), "typed across two reads, and what follows is not sent"
    d = Detach(detach_keys("ctrl-x,x"))
    assert d.feed(b"text\x18xmore") == (b"text", True)
    d = Detach(detach_keys("ctrl-p,ctrl-p,ctrl-q"))
    assert d.feed(b"\x10\x10\x10\x11") == (b"\x10", True), "a key that repeats the sequence's start"
    big = b"y" * 1_000_000
    assert Detach().feed(big) == (big, False)
