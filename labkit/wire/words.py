"""Docker's words for a container's state and for signals, which the CLI and the Engine API both use.

``docker ps`` says "Up 3 minutes", "Exited (0) About an hour ago", "Created" (go-units' HumanDuration for
the time); `docker kill -s` takes a signal as a number or a name, with or without SIG. The agent (the Engine
API) and the client (``labkit ps``, ``labkit kill``, ``lab.containers()``) use these functions so that both
say and take the same. Standard library only.
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


def container_status(row):
    """A container row's STATUS, as `docker ps` prints it. ``row``: {state, started, exit_code, finished}. An exit
    code of None (the container ended while no supervisor was there to see how) prints as "?"."""
    if row.get("state") == "running":
        return f"Up {ago(row.get('started'))}"
    if row.get("state") == "exited":
        code = row.get("exit_code")
        return f"Exited ({'?' if code is None else code}) {ago(row.get('finished'))} ago"
    return "Created"
