"""A key provider's own persistent keyset: one JSON file per provider, written atomically, mode 0600.

Walking-skeleton note: each provider holds whole private keys at rest in this file. The confidential
aggregation issue replaces this with one Shamir share per provider and attested release.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    population_name: str
    public_key_hex: str
    private_key_hex: str
    activation_unix: int
    expiration_unix: int


class KeyStore:
    """Thread-safe file-backed map of population -> keys."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def keys(self, population: str) -> list[StoredKey]:
        with self._lock:
            return [k for k in self._load() if k.population_name == population]

    def find(self, key_id: str) -> StoredKey | None:
        with self._lock:
            return next((k for k in self._load() if k.key_id == key_id), None)

    def add(self, key: StoredKey) -> None:
        with self._lock:
            keys = self._load()
            keys.append(key)
            self._save(keys)

    def _load(self) -> list[StoredKey]:
        if not self._path.exists():
            return []
        return [StoredKey(**item) for item in json.loads(self._path.read_text())["keys"]]

    def _save(self, keys: list[StoredKey]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".keyset-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump({"keys": [asdict(k) for k in keys]}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
