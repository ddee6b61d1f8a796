"""Obtaining a population key inside the worker: sealed to a fresh ephemeral key, checked, kept in memory only.

Walking-skeleton scheme: one key service releases the whole key to an authenticated internal caller. The
confidential-aggregation issue replaces this with attested t-of-n Shamir share release.
"""

from __future__ import annotations

import grpc
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcompute.aggregator.contributions import Rejected
from fedcompute.clients.typed import KeyClient
from fedcompute.keys import hpke
from fedcompute.keys.service import release_context
from fedcompute.v1 import key_pb2


class KeyUnavailable(Exception):
    """No key service could release the key right now (retry the job later)."""


class JobKeys:
    """Resolves key ids for one job; keys never leave this object or touch disk."""

    def __init__(self, clients: list[KeyClient], task_id: str, round_: int, job_id: str) -> None:
        self._clients = clients
        self._task_id = task_id
        self._round = round_
        self._job_id = job_id
        self._keys: dict[str, X25519PrivateKey] = {}
        self._unknown: set[str] = set()

    def __call__(self, key_id: str) -> X25519PrivateKey:
        if key_id in self._unknown:
            raise Rejected("unknown_key")
        if key_id not in self._keys:
            self._keys[key_id] = self._fetch(key_id)
        return self._keys[key_id]

    def _fetch(self, key_id: str) -> X25519PrivateKey:
        ephemeral = hpke.generate_private_key()
        recipient = hpke.public_bytes(ephemeral.public_key())
        request = key_pb2.ReleaseKeyShareRequest(
            key_id=key_id,
            task_id=self._task_id,
            round=self._round,
            aggregation_job_id=self._job_id,
            recipient_public_key=recipient,
        )
        last_error = "no key service configured"
        for client in self._clients:
            try:
                response = client.release_key_share(request)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    self._unknown.add(key_id)
                    raise Rejected("unknown_key") from None
                last_error = f"{exc.code().name}: {exc.details()}"
                continue
            expected = release_context(
                key_id, response.provider_id, self._task_id, self._round, self._job_id, recipient
            )
            if response.release_context != expected:
                last_error = f"provider {response.provider_id} sealed the key under another context"
                continue
            try:
                raw = hpke.open_sealed(response.encrypted_share, ephemeral, expected)
                key = hpke.load_private(raw)
            except (hpke.DecryptionError, ValueError):
                last_error = f"provider {response.provider_id} returned key material that does not open"
                continue
            if hpke.key_id_for(hpke.public_bytes(key.public_key())) != key_id:
                last_error = f"provider {response.provider_id} returned a key that does not match {key_id}"
                continue
            return key
        raise KeyUnavailable(f"key {key_id} could not be obtained: {last_error}")
