"""A key provider's own persistent state: its shares (sealed under its KEK), the access policies it registered,
its release ledger per (policy, round), the privacy budget each policy has spent, and used result ids.

One JSON file per provider, written atomically and durably (temp -> fsync -> rename -> fsync of the directory),
mode 0600. The state is parsed once and kept: a read or a change parses the file again only if it changed behind
this process's back (its inode, size or mtime differ from what this process last read or wrote: a rewrite in
place to the same size within the file system's timestamp tick of this process's last write, a few
milliseconds, goes unseen until the file changes again; the provider's directory is its own), and a change
that raises is dropped from memory as it never reached the disk. The ledger grows by a round's input set with
every release (about 10 KB a round of 100 devices); at 1,000 such rounds a release parsed the 10 MB file four
times and wrote it once, through ``dataclasses.asdict``'s deep copy: 228 ms for the write alone, 131 of them
the copy. Shares are stored
ChaCha20-Poly1305-sealed under the provider's KEK, bound to their key id; a destroyed key keeps no share. The KEK
itself never sits in this directory (see ``keys/kek.py``).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedcompute.core.files import replace_durably


@dataclass
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
        self._aead = ChaCha20Poly1305(kek)
        self._lock = threading.Lock()
        self._state: KeysetState | None = None  # as last read or written by this process
        self._file: tuple[int, int, int] | None = None  # that file's (inode, size, mtime_ns)
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
            return KeysetState(
                dict(state.keys), dict(state.policies), dict(state.releases), dict(state.charged),
                dict(state.used_result_ids),
            )  # fmt: skip

    @contextmanager
    def mutate(self) -> Iterator[KeysetState]:
        """The state, to change; saved atomically when the block ends (serialized within this process). A block
        that raises saves nothing, and its changes are forgotten here too (the file is read again)."""
        with self._lock:
            state = self._current()
            try:
                yield state
                self._save(state)
            except BaseException:
                self._state = self._file = None
                raise

    def _current(self) -> KeysetState:
        seen = _identity(self._path)
        if self._state is None or seen != self._file:
            self._state, self._file = self._load(), seen
        return self._state

    def _load(self) -> KeysetState:
        if not self._path.exists():
            return KeysetState()
        data = json.loads(self._path.read_text())
        return KeysetState(
            keys={k: StoredKey(**v) for k, v in data["keys"].items()},
            policies=data.get("policies", {}),
            releases={k: [RoundRelease(**r) for r in v] for k, v in data.get("releases", {}).items()},
            charged=data.get("charged", {}),
            used_result_ids=data["used_result_ids"],
        )

    def _save(self, state: KeysetState) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".keyset-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(as_json(state)))
                handle.flush()
                os.fsync(handle.fileno())
            replace_durably(tmp, self._path)  # a share, a policy or a charge survives a power cut once saved
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._state, self._file = state, _identity(self._path)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells this file from another version of it, or None if there is none."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def as_json(state: KeysetState) -> dict[str, object]:
    """The state as ``dataclasses.asdict`` gives it, without its deep copy: the records' own dicts, which
    ``json.dumps`` only reads (every field is a str, int, bool or a list of str)."""
    return {
        "keys": {k: vars(v) for k, v in state.keys.items()},
        "policies": state.policies,
        "releases": {k: [vars(r) for r in v] for k, v in state.releases.items()},
        "charged": state.charged,
        "used_result_ids": state.used_result_ids,
    }
