"""One key provider: keeps an active HPKE key per population, publishes it, releases it sealed to a worker."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from datetime import timedelta

import structlog

from fedcompute.core.clock import Clock
from fedcompute.core.errors import InvalidArgument, NotFound
from fedcompute.keys import hpke
from fedcompute.keys.keystore import KeyStore, StoredKey

log = structlog.get_logger("fedcompute.keys")
RELEASE_MAGIC = b"fedcompute/key-release/v1\x00"


@dataclass(frozen=True)
class PublishedKey:
    key_id: str
    population_name: str
    public_key: bytes
    activation_unix: int
    expiration_unix: int
    provider_id: str


@dataclass(frozen=True)
class Release:
    provider_id: str
    share_index: int
    encrypted_share: bytes
    release_context: bytes


def release_context(key_id: str, provider_id: str, task_id: str, round_: int, job_id: str, recipient: bytes) -> bytes:
    """Canonical bytes a release is sealed under (HPKE info): binds it to one key, provider, job and recipient."""
    parts = [RELEASE_MAGIC]
    for text in (key_id, provider_id, task_id):
        raw = text.encode()
        parts.append(struct.pack(">H", len(raw)) + raw)
    parts.append(struct.pack(">Q", round_))
    raw_job = job_id.encode()
    parts.append(struct.pack(">H", len(raw_job)) + raw_job)
    parts.append(recipient)
    return b"".join(parts)


class KeyService:
    """Generates a population's key on first request and rotates it before it expires."""

    def __init__(self, store: KeyStore, clock: Clock, provider_id: str, lifetime_s: int, max_age_s: int) -> None:
        self._store = store
        self._clock = clock
        self._provider_id = provider_id
        self._lifetime_s = lifetime_s
        self._max_age_s = max_age_s
        self._lock = threading.Lock()

    @property
    def max_age_s(self) -> int:
        return self._max_age_s

    def public_keys(self, population: str) -> list[PublishedKey]:
        if not population.strip():
            raise InvalidArgument("population_name", "must not be empty")
        now = int(self._clock.now().timestamp())
        with self._lock:
            keys = [k for k in self._store.keys(population) if k.activation_unix <= now < k.expiration_unix]
            # Rotate: publish the next key while the current one still has more than one max-age to live.
            if not any(k.expiration_unix - now > self._max_age_s for k in keys):
                keys.append(self._generate(population, now))
        return [self._published(k) for k in keys]

    def release(self, key_id: str, task_id: str, round_: int, job_id: str, recipient: bytes) -> Release:
        key = self._store.find(key_id)
        if key is None:
            raise NotFound(f"key {key_id!r} is not held by provider {self._provider_id}")
        try:
            recipient_key = hpke.load_public(recipient)
        except ValueError as exc:
            raise InvalidArgument("recipient_public_key", str(exc)) from None
        context = release_context(key_id, self._provider_id, task_id, round_, job_id, recipient)
        sealed = hpke.seal(bytes.fromhex(key.private_key_hex), recipient_key, context)
        log.info("key_released", key_id=key_id, job_id=job_id)
        return Release(self._provider_id, 0, sealed, context)

    def _generate(self, population: str, now: int) -> StoredKey:
        private = hpke.generate_private_key()
        public = hpke.public_bytes(private.public_key())
        key = StoredKey(
            key_id=hpke.key_id_for(public),
            population_name=population,
            public_key_hex=public.hex(),
            private_key_hex=hpke.private_bytes(private).hex(),
            activation_unix=now,
            expiration_unix=now + int(timedelta(seconds=self._lifetime_s).total_seconds()),
        )
        self._store.add(key)
        log.info("key_generated", key_id=key.key_id, population=population)
        return key

    def _published(self, key: StoredKey) -> PublishedKey:
        return PublishedKey(
            key.key_id,
            key.population_name,
            bytes.fromhex(key.public_key_hex),
            key.activation_unix,
            key.expiration_unix,
            self._provider_id,
        )
