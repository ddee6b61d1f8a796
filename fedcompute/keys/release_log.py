"""A key provider's append-only release log: hash-chained, every entry signed, served to anyone who asks.

Each entry's body is canonical JSON (keys sorted, no spaces, ASCII) of one release decision, carrying ``seq``
(0, 1, ...) and ``prev`` (sha256 hex of the previous body; 64 zeros for the first). The provider signs the
body with its ES256 key. ``verify_entries`` checks signatures, the chain and sequence numbers, so an entry
cannot be removed, reordered or altered without the provider's key; `fedcompute audit` runs it on every
provider's log. Stored as JSON lines, appended with fsync before the share leaves the provider.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.core.files import fsync_directory, lock_current
from fedcompute.keys import statement

GENESIS = "0" * 64


class LogInvalid(Exception):
    """A release log that fails verification; the message names the entry and the problem."""


@dataclass(frozen=True)
class SignedEntry:
    body: bytes
    signature: bytes


def canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class ReleaseLog:
    def __init__(self, path: Path, signing_key: ec.EllipticCurvePrivateKey) -> None:
        self._path = path
        self._key = signing_key
        self._lock = threading.Lock()
        # (entries, sha256 hex of the last body): read from the file once, then kept by each append, which made
        # an append read and parse the whole log (13 ms at 3,000 entries here, growing by ~4 us an entry); read
        # again when the file is not as the last append left it (``_left``: another process appended to it)
        self._tail: tuple[int, str] | None = None
        self._left: tuple[int, int, int, int] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Add one entry (``seq`` and ``prev`` are filled in), durable before this returns. Appends are serialized
        across processes too (an exclusive ``flock`` on the file): a second process on the same directory, as
        during a rollout that overlaps two key-service pods on one volume, continues the chain from the file
        instead of from what it last wrote (which forked the chain, and every audit of the log failed from there)."""
        with self._lock, self._locked_file() as handle:
            fd = handle.fileno()
            if self._tail is None or self._left != _as_left(os.fstat(fd)):
                self._cut_torn_tail()
                entries = self._read()
                self._tail = (len(entries), hashlib.sha256(entries[-1].body).hexdigest() if entries else GENESIS)
            count, prev = self._tail
            body = {**fields, "seq": count, "prev": prev}
            raw = canonical(body)
            line = {"body": _b64(raw), "signature": _b64(statement.sign_bytes(raw, self._key))}
            self._tail = None  # until the entry is durable: a failed write makes the next append read the file
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(fd)
            if not count:  # the file may be new: its name is durable only once its directory is fsynced
                fsync_directory(self._path.parent)
            self._tail, self._left = (count + 1, hashlib.sha256(raw).hexdigest()), _as_left(os.fstat(fd))
        return body

    @contextmanager
    def _locked_file(self) -> Iterator[TextIO]:
        """The log file, open to append, under an exclusive ``flock`` (released when it closes): the file the path
        names once the lock is held, so that an entry is never written to one replaced meanwhile (a restore)."""
        fd = None
        while fd is None:
            fd = lock_current(self._path, os.O_WRONLY | os.O_APPEND)
        with os.fdopen(fd, "a") as handle:
            yield handle

    def entries(self, start_seq: int = 0) -> list[SignedEntry]:
        with self._lock:
            return self._read()[start_seq:]

    def _cut_torn_tail(self) -> None:
        """Drop what follows the file's last newline: a line whose write was cut off (a full disk, a kill), never
        acknowledged (an append returns once its whole line is fsynced), which the next line would otherwise be
        appended to, leaving the file unreadable from there on."""
        if not self._path.exists():
            return
        with self._path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            if not end:
                return
            handle.seek(end - 1)
            if handle.read(1) == b"\n":
                return  # ends with a whole line (the usual case): one byte read
            handle.seek(0)
            whole = handle.read().rfind(b"\n") + 1
        os.truncate(self._path, whole)

    def _read(self) -> list[SignedEntry]:
        """The entries of the file's whole lines (a torn last line, ``_cut_torn_tail``, is no entry)."""
        if not self._path.exists():
            return []
        out = []
        text = self._path.read_text()
        for line in text[: text.rfind("\n") + 1].splitlines():
            if line.strip():
                item = json.loads(line)
                out.append(SignedEntry(base64.b64decode(item["body"]), base64.b64decode(item["signature"])))
        return out


def verify_entries(
    entries: list[SignedEntry], provider_id: str, public_key: ec.EllipticCurvePublicKey
) -> list[dict[str, Any]]:
    """The decoded bodies of a whole log (from seq 0), or ``LogInvalid`` at the first entry that does not verify."""
    bodies: list[dict[str, Any]] = []
    prev = GENESIS
    for position, entry in enumerate(entries):
        where = f"{provider_id} release log entry {position}"
        if not statement.verify_signature(entry.body, entry.signature, public_key):
            raise LogInvalid(f"{where}: signature does not verify under the pinned key")
        try:
            body = json.loads(entry.body)
        except ValueError:
            raise LogInvalid(f"{where}: body is not JSON") from None
        if not isinstance(body, dict) or canonical(body) != entry.body:
            raise LogInvalid(f"{where}: body is not canonical JSON")
        if body.get("seq") != position:
            raise LogInvalid(f"{where}: sequence number {body.get('seq')!r}, expected {position} (entries missing?)")
        if body.get("prev") != prev:
            raise LogInvalid(f"{where}: does not chain to the previous entry (log rewritten?)")
        if body.get("provider_id") != provider_id:
            raise LogInvalid(f"{where}: written by {body.get('provider_id')!r}")
        prev = hashlib.sha256(entry.body).hexdigest()
        bodies.append(body)
    return bodies


def _as_left(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file apart from the one an append left: device, inode, size and change time (a rewrite in
    place to the same size moves the last)."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_ctime_ns


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
