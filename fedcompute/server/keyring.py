"""The server's cache of a population's published public key (fetched from the key services, relayed as-is)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import grpc

from fedcompute.clients.typed import KeyClient
from fedcompute.core.clock import Clock
from fedcompute.core.errors import Unavailable
from fedcompute.v1 import common_pb2, key_pb2


class KeyRing:
    def __init__(self, client: KeyClient, clock: Clock) -> None:
        self._client = client
        self._clock = clock
        self._cache: dict[str, tuple[datetime, common_pb2.PublicKey]] = {}
        self._lock = threading.Lock()

    def active_key(self, population: str) -> common_pb2.PublicKey:
        """The key devices should encrypt to now: the active one with the latest expiry."""
        now = self._clock.now()
        with self._lock:
            cached = self._cache.get(population)
        if cached and cached[0] > now:
            return cached[1]
        try:
            response = self._client.get_public_keys(key_pb2.GetPublicKeysRequest(population_name=population))
        except grpc.RpcError as exc:
            raise Unavailable(f"the key service is unreachable ({exc.code().name}); retry shortly") from None
        unix = int(now.timestamp())
        active = [k for k in response.keys if k.activation_time_unix <= unix < k.expiration_time_unix]
        if not active:
            raise Unavailable(f"no active encryption key for population {population!r}; retry shortly")
        key = max(active, key=lambda k: k.expiration_time_unix)
        ttl = timedelta(seconds=min(response.max_age.seconds, max(key.expiration_time_unix - unix, 0)))
        with self._lock:
            self._cache[population] = (now + ttl, key)
        return key
