"""Docker's words for a container's state, for signals and for detach keys, which the CLI and the Engine API
both use.

``docker ps`` says "Up 3 minutes", "Exited (0) About an hour ago", "Created" (go-units' HumanDuration for
the time); `docker kill -s` takes a signal as a number or a name, with or without SIG. The agent (the Engine
API) and the client (``labkit ps``, ``labkit kill``, ``lab.containers()``) use these functions so that both
say and take the same; ``--detach-keys`` (Ctrl-P Ctrl-Q by default) is read and watched for by the same
:class:`Detach` in the CLI's terminal relay, the supervisor's attached clients and the API's exec. Standard
library only.
"""
import signal
import time


def signal_number(name):
    """A signal as `docker kill -s` takes it: 9, KILL, kill or SIGKILL. ValueError when it is none."""
    text = str(name).upper()
    try:
        return int(signal.Signals(int(text)) if text.isdigit() else
                   signal.Signals[text if text.startswith("SIG") else "SIG" + text])
    except (KeyError, ValueError, OverflowError):
        raise ValueError(f"{name!r} is not a signal") from None


def ago(t, now=None):
    """How long since ``t`` (epoch seconds), as Docker says it: "Less than a second", "5 seconds",
    "About a minute", "3 minutes", "About an hour", "2 days"."""
    s = max(0, int((time.time() if now is None else now) - (t if t is not None else time.time())))
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= n:
            k = s // n
            return f"{k} {unit}s" if k > 1 else f"About {'an' if unit == 'hour' else 'a'} {unit}"
    return "Less than a second" if s < 1 else f"{s} seconds"


def pull_status(facts):
    """docker pull's last word on a pull, from its record's facts: nothing fetched when the tag already named the
    registry's manifest."""
    return "Image is up to date" if (facts or {}).get("up_to_date") else "Downloaded newer image"


def container_status(row):
    """A container row's STATUS, as `docker ps` prints it. ``row``: {state, started, exit_code, finished}. An exit
    code of None (the container ended while no supervisor was there to see how) prints as "?"."""
    if row.get("state") == "running":
        return f"Up {ago(row.get('started'))}"
    if row.get("state") == "exited":
        code = row.get("exit_code")
        return f"Exited ({'?' if code is None else code}) {ago(row.get('finished'))} ago"
    return "Created"


DETACH_KEYS = "ctrl-p,ctrl-q"  # Docker's default: type these in `run -it` or `attach` and the container goes on
DETACHED = "detached"  # what an attached run returns when its client left with the detach keys (not an exit code)


def detach_keys(spec=DETACH_KEYS):
    """Docker's ``--detach-keys`` as bytes: comma-separated keys, each one character, or ``ctrl-`` and a letter
    or one of ``@ [ \\ ] ^ _``. ValueError that names the bad key."""
    ctrl = {"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31}
    out = bytearray()
    for key in str(spec).split(","):
        k = key.strip().lower() if key.strip().lower().startswith("ctrl-") else key.strip()
        if len(k) == 1 and k.isascii() and k.isprintable():
            out.append(ord(k))
        elif k.startswith("ctrl-") and len(k) == 6 and ("a" <= k[5] <= "z" or k[5] in ctrl):
            out.append(ord(k[5]) - ord("a") + 1 if "a" <= k[5] <= "z" else ctrl[k[5]])
        elif k == "ctrl-\\\\":  # the shell's way to write ctrl-\ in Docker's own examples
            out.append(28)
        else:
            raise ValueError(f"invalid detach key {key!r} in {spec!r}: use one character, or ctrl- and a letter or one "
                             "of @ [ \\ ] ^ _, comma-separated (Docker's default is ctrl-p,ctrl-q)")
    if not out or len(out) > 16:
        raise ValueError(f"detach keys {spec!r}: give one to 16 keys, e.g. ctrl-p,ctrl-q")
    return bytes(out)


class Detach:
    """Watches typed input for the detach keys. :meth:`feed` gives back what is to be passed on, and whether
    the keys were typed (what came before them is passed on, they and what follows are not). The start of
    the sequence is held back until the next key says whether it is the sequence (then it is dropped) or
    not (then it is passed on), as Docker's escape proxy does."""

    def __init__(self, keys=None):
        self.keys = detach_keys() if keys is None else keys
        self.held = bytearray()

    def feed(self, data):
        if not self.held and self.keys[0] not in data:
            return data, False  # the usual case, a paste of 100 000 lines included: no byte-by-byte walk
        out = bytearray()
        for b in data:
            self.held.append(b)
            while self.held and self.held != self.keys[:len(self.held)]:
                out.append(self.held.pop(0))  # (what is held may still start the sequence one key later)
            if len(self.held) == len(self.keys):
                self.held.clear()
                return bytes(out), True
        return bytes(out), False
