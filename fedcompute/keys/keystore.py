"""A key provider's own persistent state: its shares (sealed under its KEK), the access policies it registered,
its release ledger per (policy, round), the privacy budget each policy has spent, and used result ids.

One JSON file per provider, written atomically and durably (temp -> fsync -> rename -> fsync of the directory),
mode 0600. Shares are stored
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
from dataclasses import asdict, dataclass, field
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
        path.parent.mkdir(parents=True, exist_ok=True)

    def seal_share(self, key_id: str, share: bytes) -> str:
        nonce = os.urandom(12)
        return (nonce + self._aead.encrypt(nonce, share, key_id.encode())).hex()

    def open_share(self, key: StoredKey) -> bytes:
        raw = bytes.fromhex(key.sealed_share_hex)
        return self._aead.decrypt(raw[:12], raw[12:], key.key_id.encode())

    def read(self) -> KeysetState:
        with self._lock:
            return self._load()

    @contextmanager
    def mutate(self) -> Iterator[KeysetState]:
        """Load, let the caller change, save atomically (serialized within this process)."""
        with self._lock:
            state = self._load()
            yield state
            self._save(state)

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
                json.dump(asdict(state), handle)
                handle.flush()
                os.fsync(handle.fileno())
            replace_durably(tmp, self._path)  # a share, a policy or a charge survives a power cut once saved
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
