"""A key provider's own persistent state: its shares (sealed under its KEK), the access policies it registered,
its release ledger per (policy, round), the privacy budget each policy has spent, and used result ids.

Two files per provider, mode 0600, in the provider's own directory:
- ``keyset.json``, a snapshot of the whole state, written atomically and durably (temp -> fsync -> rename -> fsync
  of the directory), with ``journal_seq``: the last journal entry it holds;
- ``keyset.journal``, the changes since, one JSON line per change (``seq``, then per table the entries set, an
  entry removed as null), each appended and fsynced before the change's caller goes on.
A change to the keys or the policies (rare: a key imported, activated or destroyed; a task's policy registered)
writes the snapshot, so ``keyset.json`` always holds every share and policy as they are; a change to the ledger
alone (a release: its round's input set, the charge, the attestation result's id) appends one line, whose size
is the round's (about 10 KB for 100 devices), not the ledger's: a release at 1,000 rounds of 100 devices wrote
the whole 10 MB file (45 ms), at 10,000 rounds 100 MB (517 ms). The snapshot is written again once the journal
outgrows it (``JOURNAL_MIN_BYTES`` at least), then the journal emptied; a crash between the two leaves lines the
snapshot already holds, which a load skips by their ``seq``. A line a crash cut short (never acknowledged: its
fsync had not returned) is dropped at the next load and cut off before the next append; a whole line that does
not parse, a gap in the sequence or an entry twice stops the load (``KeysetCorrupted``): the state is damaged,
restore it. Each change holds an exclusive ``flock`` on ``keyset.lock`` beside them.

The state is parsed once and kept: a read or a change parses the files again only if either changed behind this
process's back (its inode, size or mtime differ from what this process last read or wrote: a rewrite in place to the
same size within the file system's timestamp tick of this process's last write, a few milliseconds, goes unseen
until the file changes again; the provider's directory is its own, and one process writes it: a second one, as two
pods of one provider overlapping on a volume, waits for ``keyset.lock``, and its lines and snapshots change the
files' size or inode), and a change that raises is dropped from memory as it never reached the disk. Its tables
record which entries a change set or removed: a change is an assignment (``state.releases[slot] = [...]``), never a
record changed in place, which would reach the disk only with the next snapshot (``StoredKey`` is frozen:
``dataclasses.replace``). Shares are stored ChaCha20-Poly1305-sealed under the provider's KEK, bound to their key
id; a destroyed key keeps no share. The KEK itself never sits in this directory (see ``keys/kek.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedcompute.core.files import fsync_directory, replace_durably, write_all

JOURNAL_MIN_BYTES = 1 << 20  # the journal is folded into a new snapshot once over this and over the snapshot's size
TABLES = ("keys", "policies", "releases", "charged", "used_result_ids")
JOURNALED = ("releases", "charged", "used_result_ids")  # what a change that leaves keys and policies appends


class KeysetCorrupted(Exception):
    """The provider's state files cannot be read back as written: restore them from a copy."""


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    population_name: str
    statement_hex: str  # serialized PublicKey (with signatures once activated)
    share_index: int
    sealed_share_hex: str  # nonce || ChaCha20-Poly1305(KEK, share, aad=key_id); "" once destroyed
    activated: bool
    destroyed: bool
    activation_unix: int
    expiration_unix: int
    destruction_unix: int


@dataclass
class RoundRelease:
    """One input set released for a (policy, round); later input sets for that round must be disjoint from it."""

    input_set_sha256_hex: str
    assignment_ids: list[str]
    envelope_sha256s: list[str]
    # the recipient keys (hex) of the aggregation attempts charged for this input set: one attempt (one recipient
    # key, one output) asking again, for its other key id or after a lost answer, is not charged again
    recipients: list[str] = field(default_factory=list)
    # under DP, the release numbers each of those attempts was granted (keys/ledger.py): asked again with one of
    # them, it is a repeat; with another, a release of its own number
    numbers: dict[str, list[int]] = field(default_factory=dict)


V = TypeVar("V")


class Tracked(dict[str, V]):
    """A table of the state that records the entries set or removed since ``changed`` was last cleared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed: set[str] = set()

    def __setitem__(self, key: str, value: V) -> None:
        super().__setitem__(key, value)
        self.changed.add(key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.changed.add(key)

    def setdefault(self, key: str, default: V) -> V:
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key: str, *default: Any) -> Any:
        self.changed.add(key)
        return super().pop(key, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> Tracked[V]:  # type: ignore[misc,override]
        raise TypeError("set entries one by one (or update): a keyset table records which it changed")

    def popitem(self) -> tuple[str, V]:
        raise TypeError("remove entries by key: a keyset table records which it changed")

    def clear(self) -> None:
        self.changed.update(self)
        super().clear()


@dataclass
class KeysetState:
    keys: dict[str, StoredKey] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)  # policy sha256 -> serialized AccessPolicy (hex)
    releases: dict[str, list[RoundRelease]] = field(default_factory=dict)  # "policy|round" -> input sets
    charged: dict[str, int] = field(default_factory=dict)  # policy sha256 -> DP releases charged
    used_result_ids: dict[str, int] = field(default_factory=dict)  # jti -> exp (pruned after exp)


class KeyStore:
    def __init__(self, path: Path, kek: bytes) -> None:
        self._path = path
        self._journal = path.with_suffix(".journal")
        self._aead = ChaCha20Poly1305(kek)
        self._lock = threading.Lock()
        self._state: KeysetState | None = None  # as last read or written by this process
        self._file: tuple[object, object] | None = None  # the two files' (inode, size, mtime_ns) then
        self._seq = 0  # the last journal entry in the state
        self._journal_end = 0  # where the journal's last whole line ends
        self._snapshot_bytes = 0
        self._named = False  # this process has fsynced the directory since the journal was first appended to
        path.parent.mkdir(parents=True, exist_ok=True)

    def seal_share(self, key_id: str, share: bytes) -> str:
        nonce = os.urandom(12)
        return (nonce + self._aead.encrypt(nonce, share, key_id.encode())).hex()

    def open_share(self, key: StoredKey) -> bytes:
        raw = bytes.fromhex(key.sealed_share_hex)
        return self._aead.decrypt(raw[:12], raw[12:], key.key_id.encode())

    def read(self) -> KeysetState:
        """The state now, to read: its tables are copies (a later change does not move them under the caller),
        their records the kept ones."""
        with self._lock:
            state = self._current()
            return KeysetState(*(dict(getattr(state, name)) for name in TABLES))

    @contextmanager
    def mutate(self, then: Callable[[], object] | None = None) -> Iterator[KeysetState]:
        """The state, to change; saved when the block ends (serialized within this process): a journal line, or
        the snapshot where keys or policies changed (see the module). A block that raises saves nothing, and its
        changes are forgotten here too (the files are read again). A save that raises after its journal line
        was written or its snapshot renamed into place (a failed fsync) has kept the change, durably or not: the
        error reaches the caller, ``then`` is not called, and the files read again hold it (for a release:
        charged, logged nowhere, no share sent; the safe side). ``then``: called once the change is saved, still
        in this serialization (a release's log entry: written only for what the state keeps, in the order the
        changes were made); what it raises reaches the caller, the change staying saved."""
        with self._lock, self._exclusive():
            state = self._current()
            tables = [getattr(state, name) for name in TABLES]
            try:
                yield state
                self._save(state, tables)
            except BaseException:
                self._state = self._file = None
                raise
            if then is not None:
                then()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Every change holds an exclusive ``flock`` on ``keyset.lock``: a second process on the same directory
        (one writes it, by design) waits instead of cutting off the other's journal line or reusing its number."""
        fd = os.open(self._path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _current(self) -> KeysetState:
        seen = (_identity(self._path), _identity(self._journal))
        if self._state is None or seen != self._file:
            self._state, self._file = self._load(), seen  # a change during the load: read again next time
        return self._state

    def _load(self) -> KeysetState:
        snapshot = self._path.read_bytes() if self._path.exists() else b"{}"
        data = json.loads(snapshot)
        state = KeysetState(
            keys=Tracked({k: StoredKey(**v) for k, v in data.get("keys", {}).items()}),
            policies=Tracked(data.get("policies", {})),
            releases=Tracked({k: [RoundRelease(**r) for r in v] for k, v in data.get("releases", {}).items()}),
            charged=Tracked(data.get("charged", {})),
            used_result_ids=Tracked(data.get("used_result_ids", {})),
        )
        self._seq = seq = int(data.get("journal_seq", 0))
        self._snapshot_bytes = len(snapshot)
        raw = self._journal.read_bytes() if self._journal.exists() else b""
        self._journal_end = raw.rfind(b"\n") + 1  # after it: a line a crash cut short, never acknowledged
        for number, line in enumerate(raw[: self._journal_end].splitlines(), 1):
            try:
                entry = json.loads(line)
                at = int(entry["seq"])
            except (ValueError, KeyError, TypeError) as exc:
                raise KeysetCorrupted(f"{self._journal} line {number} does not parse ({exc}): restore it") from None
            if at <= self._seq and seq == self._seq:
                continue  # the snapshot holds it (written before the journal was emptied): only ever a prefix
            if at != seq + 1:
                raise KeysetCorrupted(f"{self._journal} line {number} is entry {at}, after entry {seq}: restore it")
            _apply(state, entry)
            seq = at
        self._seq = seq
        return state

    def _save(self, state: KeysetState, tables: list[Any]) -> None:
        now = [getattr(state, name) for name in TABLES]
        kept = all(a is b and isinstance(b, Tracked) for a, b in zip(tables, now, strict=True))
        changed: dict[str, set[str]] = {
            name: getattr(table, "changed", set()) for name, table in zip(TABLES, now, strict=True)
        }
        big = self._journal_end > max(JOURNAL_MIN_BYTES, self._snapshot_bytes)
        if not kept or changed["keys"] or changed["policies"] or big:
            self._write_snapshot(state)
        elif any(changed.values()):
            self._append(state, changed)
        else:
            return
        self._state = state

    def _append(self, state: KeysetState, changed: dict[str, set[str]]) -> None:
        entry: dict[str, object] = {"seq": self._seq + 1}
        for name in JOURNALED:
            table = getattr(state, name)
            entry[name] = {k: _plain(table[k]) if k in table else None for k in sorted(changed[name])}
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self._journal, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != self._journal_end:
                os.ftruncate(fd, self._journal_end)  # a line cut short by a crash (see _load)
            write_all(fd, memoryview(line), self._journal_end)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not self._named:  # the journal's name survives a power cut too (whoever created it, whenever)
            fsync_directory(self._journal.parent)
            self._named = True
        self._seq += 1
        self._journal_end += len(line)
        for name in JOURNALED:
            getattr(state, name).changed.clear()
        self._file = (_identity(self._path), _identity(self._journal))

    def _write_snapshot(self, state: KeysetState) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".keyset-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps({**as_json(state), "journal_seq": self._seq}))
                handle.flush()
                os.fsync(handle.fileno())
            replace_durably(tmp, self._path)  # a share, a policy or a charge survives a power cut once saved
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self._journal.exists() and self._journal.stat().st_size:
            with self._journal.open("r+b") as journal:  # what the snapshot holds: a crash before this skips it
                journal.truncate(0)
                os.fsync(journal.fileno())
        self._journal_end, self._snapshot_bytes = 0, self._path.stat().st_size
        for name in TABLES:
            table = getattr(state, name)
            setattr(state, name, Tracked(table) if not isinstance(table, Tracked) else table)
            getattr(state, name).changed.clear()
        self._file = (_identity(self._path), _identity(self._journal))


def _apply(state: KeysetState, entry: dict[str, Any]) -> None:
    """One journal entry's changes, onto the state being loaded."""
    for name in JOURNALED:
        table = getattr(state, name)
        for key, value in entry.get(name, {}).items():
            if value is None:
                table.pop(key, None)
            elif name == "releases":
                table[key] = [RoundRelease(**r) for r in value]
            else:
                table[key] = value
        table.changed.clear()


def _plain(value: object) -> object:
    """A table's entry as JSON holds it (``as_json``'s)."""
    if isinstance(value, list):
        return [vars(r) for r in value]
    return value


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells this file from another version of it, or None if there is none."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def as_json(state: KeysetState) -> dict[str, object]:
    """The state as ``dataclasses.asdict`` gives it, without its deep copy: the records' own dicts, which
    ``json.dumps`` only reads (every field is a str, int, bool, a list of str or a dict of lists of int)."""
    return {
        "keys": {k: vars(v) for k, v in state.keys.items()},
        "policies": state.policies,
        "releases": {k: [vars(r) for r in v] for k, v in state.releases.items()},
        "charged": state.charged,
        "used_result_ids": state.used_result_ids,
    }
