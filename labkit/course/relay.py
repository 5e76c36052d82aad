"""The grader's relay: a submission's only way to its agent, and the journal of everything it was told.

While a submission runs, the student's kernel does not hold a connection to the agent: it connects to a
unix socket (``labkit.connect("unix:///…/relay.sock")``) that the grader owns. The relay says the agent's
hello, passes every request line on through the grader's own channel to the (disposable) agent, and
keeps every answer in a journal. A record that the student's kernel later shows the grader (a check's
argument) is looked up there by its digest (:func:`labkit.client.records.record_digest`): one the agent
really returned is found and the grader uses the journal's copy; a hand-made or edited one is not, and
scores zero with that reason.

Each request is read with the protocol's bounds (one line, at most ``MAX_LINE`` bytes, valid JSON) and
answered in order; a line the relay cannot read is answered with the error, as the agent would. The socket
is made in a directory of the grader's choosing with mode 0600 and, given ``owner``, owned by the sandbox's
user, so no one else on the machine reaches the agent through it. The journal holds at most
:data:`MAX_JOURNAL` bytes of answers: past that (a submission, or a hostile agent, that answers without end)
every further request is refused, and the grader's memory stays bounded.
"""
import json
import os
import socket
import threading

from ..client.records import record_digest
from ..wire import protocol
from ..wire.errors import LabkitError, ProtocolError


#: the most answer bytes one submission's journal keeps; the relay refuses every request past it
MAX_JOURNAL = 256 << 20


class Relay:
    """``Relay(channel, path, owner=None)``: serve ``path`` until :meth:`close` (also a context manager)."""

    def __init__(self, channel, path, owner=None, backlog=8, max_seconds=None):
        self.channel, self.path = channel, path
        self.max_seconds = max_seconds  # no request may make the grader wait longer (its lock is shared)
        self.journal = []           # every answer: {"method", "params", "ok", "result" | "error"}
        self.journal_bytes = 0      # the size of those answers as sent (bounded by MAX_JOURNAL)
        self._index = {}            # record digest -> journal position
        self._lock = threading.Lock()
        self._closing = False
        self._conns = []
        if os.path.lexists(path):
            raise LabkitError(f"{path} exists already", fix="give the relay a path of its own (a fresh directory)")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # no umask dance: the umask is the whole process's, and a grader with --jobs runs threads that fork
        # sandboxes meanwhile. The socket's directory is what keeps others out; the mode is set right after.
        self.sock.bind(path)
        os.chmod(path, 0o600)
        if owner is not None:
            os.chown(path, owner, -1)
        self.sock.listen(backlog)
        self._thread = threading.Thread(target=self._accept, name=f"relay {path}", daemon=True)
        self._thread.start()

    # -- serving --------------------------------------------------------------------------------
    def _accept(self):
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"relay conn {self.path}", daemon=True).start()

    def _serve(self, conn):
        try:
            conn.sendall(protocol.encode(self.channel.hello, sender="agent"))
            buf = b""
            while True:
                while b"\n" not in buf:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > protocol.MAX_LINE and b"\n" not in buf:
                        err = protocol.long_error("client", len(buf))
                        conn.sendall(protocol.encode(protocol.response(None, error=err.to_wire()), sender="agent"))
                        return
                line, buf = buf.split(b"\n", 1)
                conn.sendall(self._answer(line + b"\n"))
        except OSError:
            return
        finally:
            conn.close()

    def _answer(self, line):
        try:
            req = protocol.decode(line, sender="client")
            if not isinstance(req, dict) or not isinstance(req.get("method"), str) \
                    or not isinstance(req.get("params", {}), dict):
                raise ProtocolError("a request is an object with a method and params",
                                    fix="use labkit.connect(...) and the Lab's methods")
        except LabkitError as exc:
            return protocol.encode(protocol.response(None, error=exc.to_wire()), sender="agent")
        method, params, rid = req["method"], req.get("params") or {}, req.get("id")
        params = {k: v for k, v in params.items() if k != "_timeout"}  # the wait is the grader's to choose
        if self.max_seconds is not None:
            for k in ("timeout", "seconds"):
                if isinstance(params.get(k), (int, float)) and not isinstance(params[k], bool) \
                        and params[k] > self.max_seconds:
                    params[k] = self.max_seconds
        if self.journal_bytes > MAX_JOURNAL:
            exc = LabkitError(f"this submission's answers passed {MAX_JOURNAL / 2 ** 20:g} MiB: the grader relays "
                              "no more",
                              fix="print and keep less (read a file in parts, limit a command's output)")
            return protocol.encode(protocol.response(rid, error=exc.to_wire()), sender="agent")
        entry = {"method": method, "params": params}
        try:
            result = self.channel.call(method, **params)
        except LabkitError as exc:
            entry.update(ok=False, error=exc.to_wire())
            line = protocol.encode(protocol.response(rid, error=exc.to_wire()), sender="agent")
            self._keep(entry, len(line))
            return line
        entry.update(ok=True, result=result)
        try:
            line = protocol.encode(protocol.response(rid, result=result), sender="agent")
        except LabkitError as exc:
            line = protocol.encode(protocol.response(rid, error=exc.to_wire()), sender="agent")
        self._keep(entry, len(line))
        return line

    def _keep(self, entry, size):
        with self._lock:
            self.journal_bytes += size
            self.journal.append(entry)
            digest = record_digest(entry.get("result")) if entry.get("ok") else None
            if digest:
                self._index.setdefault(digest, len(self.journal) - 1)

    # -- what the grader asks ---------------------------------------------------------------------
    def lookup(self, digest):
        """The journal's copy of the record with this digest (what the agent really answered), or None."""
        with self._lock:
            at = self._index.get(digest) if isinstance(digest, str) else None
            return None if at is None else json.loads(json.dumps(self.journal[at]["result"]))

    def close(self):
        self._closing = True
        try:
            self.sock.close()
        except OSError:
            pass
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        if os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
