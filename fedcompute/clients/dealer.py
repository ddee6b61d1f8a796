"""The key dealer: runs key ceremonies for populations that need a key, and rotates keys before they expire.

Ceremony: generate an X25519 key, split it t-of-n, HPKE-wrap share i to provider i's wrapping key, collect every
provider's signature over the key statement, activate the signed key at every provider, erase the dealer's
copy. Honest limit: the dealer sees the private key for the length of a ceremony (a DKG would remove that).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import grpc
import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.clients.typed import KeyClient, TaskManagementClient
from fedcompute.core.clock import Clock
from fedcompute.core.secrets import operator_token
from fedcompute.core.settings import Settings
from fedcompute.keys import hpke, statement
from fedcompute.keys.service import import_context
from fedcompute.keys.shamir import split_key
from fedcompute.keys.trust import load_trusted
from fedcompute.rpc.channels import channel_for
from fedcompute.v1 import common_pb2, key_pb2, task_management_pb2

log = structlog.get_logger("fedcompute.dealer")


class CeremonyFailed(Exception):
    """A key ceremony could not complete (a provider is down or misbehaved); nothing was activated."""


class KeyDealer:
    def __init__(
        self,
        providers: list[KeyClient],
        trusted: Mapping[str, ec.EllipticCurvePublicKey],
        threshold: int,
        clock: Clock,
        lifetime_s: int,
        destroy_after_s: int,
        rotate_before_s: int,
        populations: Callable[[], set[str]],
        recheck_s: float = 0.0,
    ) -> None:
        """``populations``: those that need a key now (asked every ``run_once``); a population found keyed is not
        asked about again for ``recheck_s`` (housekeeping: keys live for days and rotate hours ahead)."""
        self._providers = providers
        self._trusted = trusted
        self._threshold = threshold
        self._clock = clock
        self._lifetime = timedelta(seconds=lifetime_s)
        self._destroy_after = timedelta(seconds=destroy_after_s)
        self._rotate_before = rotate_before_s
        self._populations = populations
        self._recheck = timedelta(seconds=recheck_s)
        self._keyed_until: dict[str, datetime] = {}  # population -> when to look at its keys again

    def run_once(self) -> int:
        made = 0
        populations = self._populations()
        self._keyed_until = {p: t for p, t in self._keyed_until.items() if p in populations}  # bounded
        for population in sorted(populations):
            now = self._clock.now()
            if now < self._keyed_until.get(population, now):
                continue
            try:
                if self.needs_key(population):
                    self.ceremony(population)
                    made += 1
                self._keyed_until[population] = now + self._recheck
            except (CeremonyFailed, grpc.RpcError) as exc:
                log.warning("key_ceremony_postponed", population=population, reason=str(exc))
        return made

    def needs_key(self, population: str) -> bool:
        now = int(self._clock.now().timestamp())
        for client in self._providers:
            try:
                keys = client.get_public_keys(key_pb2.GetPublicKeysRequest(population_name=population)).keys
            except grpc.RpcError:
                continue
            return not any(k.expiration_time_unix - now > self._rotate_before for k in keys)
        raise CeremonyFailed("no key service is reachable")

    def ceremony(self, population: str) -> common_pb2.PublicKey:
        infos = [c.get_provider_info(key_pb2.GetProviderInfoRequest()) for c in self._providers]
        for info in infos:
            pinned = self._trusted.get(info.provider_id)
            if pinned is None or statement.public_der(pinned) != info.signing_public_key:
                raise CeremonyFailed(f"provider {info.provider_id} is not the one this dealer trusts")
        secret = hpke.generate_private_key()
        now = self._clock.now()
        expiration = now + self._lifetime
        public = hpke.public_bytes(secret.public_key())
        key = common_pb2.PublicKey(
            key_id=hpke.key_id_for(public),
            public_key=public,
            kem_id=hpke.KEM_ID,
            kdf_id=hpke.KDF_ID,
            aead_id=hpke.AEAD_ID,
            activation_time_unix=int(now.timestamp()),
            expiration_time_unix=int(expiration.timestamp()),
            destruction_time_unix=int((expiration + self._destroy_after).timestamp()),
            population_name=population,
            threshold=self._threshold,
            provider_ids=[i.provider_id for i in infos],
        )
        shares = split_key(hpke.private_bytes(secret), self._threshold, len(infos))
        del secret  # the dealer's copy: best effort in CPython, which cannot guarantee erasure
        signatures = []
        for (index, share), client, info in zip(shares, self._providers, infos, strict=True):
            wrapped = hpke.seal(
                share, hpke.load_public(info.wrapping_public_key), import_context(key.key_id, info.provider_id, index)
            )
            reply = client.import_key_share(
                key_pb2.ImportKeyShareRequest(key=key, share_index=index, wrapped_share=wrapped)
            )
            signatures.append(reply.signature)
        shares.clear()
        key.signatures.extend(signatures)
        statement.check_trusted(key, self._trusted, len(infos))
        for client in self._providers:
            client.activate_key(key_pb2.ActivateKeyRequest(key=key))
        log.info("key_ceremony_done", key_id=key.key_id, population=population, threshold=self._threshold)
        return key


def open_populations(operators: TaskManagementClient) -> set[str]:
    """Populations with an open task (they need a key), read through the operator API."""
    populations: set[str] = set()
    token = ""
    while True:
        page = operators.list_tasks(
            task_management_pb2.ListTasksRequest(
                page_size=100, page_token=token, status=task_management_pb2.TASK_STATUS_OPEN
            )
        )
        populations |= {t.spec.population_name for t in page.tasks if t.status == task_management_pb2.TASK_STATUS_OPEN}
        token = page.next_page_token
        if not token:
            return populations


def operator_key_clients(settings: Settings, token: str) -> list[KeyClient]:
    return [KeyClient(channel_for(settings, a), settings.rpc_timeout_s, token) for a in settings.key_service_addresses]


def build_dealer(settings: Settings, clock: Clock, token: str) -> KeyDealer:
    providers = operator_key_clients(settings, token)
    operators = TaskManagementClient(
        channel_for(settings, settings.server_address), settings.rpc_timeout_s, operator_token(settings)
    )
    return KeyDealer(
        providers, load_trusted(settings.trusted_providers_path()), settings.threshold, clock,
        settings.key_lifetime_s, settings.key_destroy_after_s, settings.key_rotate_before_s,
        lambda: open_populations(operators), settings.housekeeping_interval_s,
    )  # fmt: skip
