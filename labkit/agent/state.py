"""The agent's state files: JSON written atomically, read back defensively.

Every record the agent keeps on disk (process and VM entries, container config and state, images, the build
cache, networks, sysctls it changed) goes through :func:`write_json`: a temporary file of a unique name in the
same directory (created with O_EXCL|O_NOFOLLOW, so two agents never share it and nothing planted there is
followed), fsync, then ``os.replace`` -- a reader sees the old file or the new one, never half of either.
:func:`read_json` reads one back; a file that is not valid JSON (truncated by a crash or a full disk, or
tampered with) is set aside as ``<name>.corrupt-<time>`` with a warning on stderr, and the reader goes on
with its default, so one bad entry never stops ``labkit cleanup``, ``ps`` or ``prune``. :func:`read_dir`
reads every ``*.json`` entry of a state directory that way. Standard library only.
"""
import json
import os
import sys
import time

from ..wire.errors import InvalidSpec

MAX_STATE_BYTES = 16 << 20  # far above any record labkit writes; a bigger file is not ours


def private_dir(path):
    """Make ``path`` root's alone (0700, even when it existed): the agent's private files (reports, process
    and VM entries), and trees that hold set-user-ID files from images or container root (layers, upper
    dirs), which no other user of the host may reach."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_json(path, obj, mode=0o600, indent=None):
    """Write ``obj`` to ``path`` atomically (unique temp in the same directory, fsync, rename)."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, mode=0o700, exist_ok=True)
    data = json.dumps(obj, indent=indent).encode()
    for _ in range(100):
        tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise InvalidSpec(f"could not make a temporary file in {d}", fix="check the directory's contents")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def set_aside(path, why):
    """Rename a bad state file out of the way (kept for a human to read) and say so on stderr."""
    aside = f"{path}.corrupt-{int(time.time())}-{os.urandom(2).hex()}"
    try:
        os.replace(path, aside)
    except OSError:
        aside = None
    print(f"labkit agent: warning: {path} {why}; "
          + (f"set aside as {aside}" if aside else "it could not be moved") + " and ignored", file=sys.stderr)
    return aside


def read_json(path, default=None):
    """The JSON in ``path``; ``default`` when it does not exist. A corrupt, oversized or non-regular file is
    set aside (:func:`set_aside`) and ``default`` returned."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return default
    except OSError as exc:
        set_aside(path, f"cannot be opened safely ({exc.strerror})")
        return default
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > MAX_STATE_BYTES:
            why = "is not a regular file" if st.st_mode & 0o170000 != 0o100000 else "is too large to be labkit's"
            data = None
        else:
            data = f.read(MAX_STATE_BYTES + 1)
    if data is None:
        set_aside(path, why)
        return default
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        set_aside(path, "is not valid JSON (truncated?)")
        return default


def read_dir(directory, suffix=".json", kind=dict):
    """[(name without suffix, object)] of every entry in ``directory`` that reads as a ``kind``; corrupt ones
    are set aside, temporaries and set-aside files skipped. [] when the directory does not exist."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for fn in names:
        if not fn.endswith(suffix) or fn.startswith("."):
            continue
        path = os.path.join(directory, fn)
        obj = read_json(path)
        if obj is None:
            continue
        if kind is not None and not isinstance(obj, kind):
            set_aside(path, f"holds a {type(obj).__name__}, not a {kind.__name__}")
            continue
        out.append((fn[: -len(suffix)], obj))
    return out
