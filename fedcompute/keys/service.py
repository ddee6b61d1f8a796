"""One key provider: imports its share of each population key, publishes signed keys, registers and signs tasks'
access policies, releases its share only to an attested aggregator under a registered policy and its release
ledger (``keys/ledger.py``), logs every release, and destroys shares after their destruction time."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import NoReturn

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.attestation.results import ReleaseBinding, ResultRejected, b64url, verify_result
from fedcompute.core.clock import Clock
from fedcompute.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from fedcompute.core.policy import AccessPolicy
from fedcompute.core.privacy import epsilon, load_accountants, load_accountants_soon
from fedcompute.keys import hpke, ledger, statement
from fedcompute.keys import policy as access_policy
from fedcompute.keys.identity import ProviderIdentity
from fedcompute.keys.keystore import KeyStore, StoredKey
from fedcompute.keys.release_log import ReleaseLog, SignedEntry
from fedcompute.v1 import common_pb2

log = structlog.get_logger("fedcompute.keys")
RELEASE_MAGIC = b"fedcompute/keyshare-release/v1\x00"
IMPORT_MAGIC = b"fedcompute/keyshare-import/v1\x00"


def _lp(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


def import_context(key_id: str, provider_id: str, share_index: int) -> bytes:
    return IMPORT_MAGIC + _lp(key_id.encode()) + _lp(provider_id.encode()) + struct.pack(">I", share_index)


def release_context(binding: ReleaseBinding, provider_id: str, share_index: int, result_id: str) -> bytes:
    """What a release is sealed under (HPKE info) and signed over: one share, one request, one result."""
    return (
        RELEASE_MAGIC
        + _lp(provider_id.encode())
        + struct.pack(">I", share_index)
        + _lp(binding.digest().encode())
        + _lp(result_id.encode())
    )


@dataclass(frozen=True)
class ReleasePolicy:
    """A relying party's own policy: the verifier it trusts and what it accepts from it (its floor; a task's
    access policy can only narrow it)."""

    verifier_key: ec.EllipticCurvePublicKey
    allowed_measurements: frozenset[str]
    allowed_hwmodels: frozenset[str]


@dataclass(frozen=True)
class Release:
    provider_id: str
    share_index: int
    encrypted_share: bytes
    release_context: bytes
    signature: bytes
    repeat: bool = False
    policy_id: str = ""
    epsilon_after: float | None = None  # ε the policy's task has spent at this provider (DP policies only)


class KeyService:
    def __init__(
        self,
        store: KeyStore,
        identity: ProviderIdentity,
        clock: Clock,
        policy: Callable[[], ReleasePolicy],
        max_age_s: int,
        release_log: ReleaseLog,
    ) -> None:
        self._store = store
        self._log = release_log
        self._id = identity
        self._clock = clock
        self._policy_source = policy
        self._policy_cache: ReleasePolicy | None = None
        self.max_age_s = max_age_s
        if any(_stored_policy(stored).dp is not None for stored in store.read().policies.values()):
            load_accountants_soon()  # a DP policy's releases will need them (imports torch: seconds)

    @property
    def _policy(self) -> ReleasePolicy:
        """Loaded on first release, so a key service can start before the verifier has published its key."""
        if self._policy_cache is None:
            try:
                self._policy_cache = self._policy_source()
            except (OSError, ValueError) as exc:
                raise Unavailable(f"this key service has no verifier key to rely on yet: {exc}") from None
        return self._policy_cache

    @property
    def identity(self) -> ProviderIdentity:
        return self._id

    def public_keys(self, population: str) -> list[common_pb2.PublicKey]:
        """Activated keys not yet expired (the next key is published before the current one expires)."""
        if not population.strip():
            raise InvalidArgument("population_name", "must not be empty")
        self.destroy_due()
        now = int(self._clock.now().timestamp())
        keys = [
            k
            for k in self._store.read().keys.values()
            if k.population_name == population and k.activated and not k.destroyed and now < k.expiration_unix
        ]
        return [common_pb2.PublicKey.FromString(bytes.fromhex(k.statement_hex)) for k in keys]

    def import_share(self, key: common_pb2.PublicKey, share_index: int, wrapped: bytes) -> bytes:
        """Store this provider's share of a new key; return the provider's signature over the statement."""
        self._check_statement(key, share_index)
        try:
            share = hpke.open_sealed(
                wrapped, self._id.wrapping_key, import_context(key.key_id, self._id.provider_id, share_index)
            )
        except hpke.DecryptionError:
            raise InvalidArgument("wrapped_share", "does not open under this provider's wrapping key") from None
        if len(share) != 32:
            raise InvalidArgument("wrapped_share", "a share is 32 bytes")
        bare = common_pb2.PublicKey()
        bare.CopyFrom(key)
        del bare.signatures[:]
        with self._store.mutate() as state:
            existing = state.keys.get(key.key_id)
            if existing and existing.statement_hex != bare.SerializeToString().hex():
                raise FailedPrecondition(f"key {key.key_id} was already imported with another statement")
            if existing is None:
                state.keys[key.key_id] = StoredKey(
                    key_id=key.key_id,
                    population_name=key.population_name,
                    statement_hex=bare.SerializeToString().hex(),
                    share_index=share_index,
                    sealed_share_hex=self._store.seal_share(key.key_id, share),
                    activated=False,
                    destroyed=False,
                    activation_unix=key.activation_time_unix,
                    expiration_unix=key.expiration_time_unix,
                    destruction_unix=key.destruction_time_unix,
                )
        log.info("key_share_imported", key_id=key.key_id, share_index=share_index)
        return statement.sign(bare, self._id.signing_key)

    def _check_statement(self, key: common_pb2.PublicKey, share_index: int) -> None:
        if hpke.key_id_for(key.public_key) != key.key_id:
            raise InvalidArgument("key.key_id", "does not match the public key")
        ids = list(key.provider_ids)
        if not 1 <= key.threshold <= len(ids) or len(set(ids)) != len(ids):
            raise InvalidArgument("key.threshold", f"must be in [1, {len(ids)}] over distinct providers")
        if not 1 <= share_index <= len(ids) or ids[share_index - 1] != self._id.provider_id:
            raise InvalidArgument("share_index", f"provider {self._id.provider_id} does not hold share {share_index}")
        if not key.activation_time_unix < key.expiration_time_unix <= key.destruction_time_unix:
            raise InvalidArgument("key", "needs activation < expiration <= destruction")

    def activate(self, key: common_pb2.PublicKey) -> None:
        """Publish the key with all providers' signatures; the statement must be the one imported."""
        bare = common_pb2.PublicKey()
        bare.CopyFrom(key)
        del bare.signatures[:]
        mine = [s for s in key.signatures if s.provider_id == self._id.provider_id]
        if not mine or not statement.verify_signature(
            statement.statement_bytes(bare), mine[0].signature, self._id.signing_key.public_key()
        ):
            raise InvalidArgument("key.signatures", "must carry this provider's own valid signature")
        with self._store.mutate() as state:
            stored = state.keys.get(key.key_id)
            if stored is None:
                raise NotFound(f"key {key.key_id} was never imported here")
            if stored.statement_hex != bare.SerializeToString().hex() and not stored.activated:
                raise FailedPrecondition("the statement differs from the imported one")
            state.keys[key.key_id] = replace(stored, statement_hex=key.SerializeToString().hex(), activated=True)
        log.info("key_activated", key_id=key.key_id, population=key.population_name)

    def destroy_due(self) -> int:
        """Erase shares whose destruction time has passed (crypto-erasure of anything sealed to their key)."""
        now = int(self._clock.now().timestamp())
        due = [k for k in self._store.read().keys.values() if not k.destroyed and k.destruction_unix <= now]
        if not due:
            return 0
        with self._store.mutate() as state:
            for key in due:
                state.keys[key.key_id] = replace(state.keys[key.key_id], sealed_share_hex="", destroyed=True)
                log.info("key_share_destroyed", key_id=key.key_id)
        return len(due)

    def register_policy(self, msg: common_pb2.AccessPolicy) -> bytes:
        """Record a task's access policy in this provider's ledger; return the provider's signature over it."""
        policy = access_policy.from_message(msg)
        policy.check()
        digest = policy.sha256_hex()
        with self._store.mutate() as state:
            state.policies.setdefault(digest, access_policy.to_message(policy).SerializeToString().hex())
        if policy.dp is not None:
            load_accountants_soon()  # its releases will need them (imports torch: seconds), not at the first one
        log.info("access_policy_registered", policy=digest, population=policy.population_name, dp=policy.dp is not None)
        return access_policy.sign(policy, self._id.signing_key)

    def _registered(self, digest: str) -> AccessPolicy:
        stored = self._store.read().policies.get(digest)
        if stored is None:
            raise FailedPrecondition(
                f"access policy {digest[:16]}… is not registered with key service {self._id.provider_id}; "
                "the operator registers a task's policy when creating it"
            )
        return _stored_policy(stored)

    def release_log(self, start_seq: int) -> list[SignedEntry]:
        return self._log.entries(start_seq)

    def release(self, binding: ReleaseBinding, attestation_result: str, inputs: list[tuple[str, str]]) -> Release:
        self.destroy_due()
        now = self._clock.now()
        claims = self._appraise(binding, attestation_result)
        policy = self._registered(binding.policy_sha256_hex)
        measurement = str(claims.get("fedcompute.measurement"))
        if measurement not in policy.allowed_measurements:
            self._refuse(binding, "the aggregator's code measurement is not one the task's access policy allows")
        ledger.check_inputs(policy, binding.input_set_sha256_hex, inputs)
        if policy.dp is not None:
            ledger.check_number(binding.release_number)  # before the accountant runs for it
            load_accountants()  # before the store's lock: the first import takes seconds (core/privacy.py)
            self._screen(policy, binding)
        # logged once the ledger is saved (a failed save must not leave a signed grant the count never took),
        # before the share leaves, in the order of the decisions
        entry: list[dict[str, object]] = []
        with self._store.mutate(then=lambda: self._log.append(entry[0])) as state:
            key = state.keys.get(binding.key_id)
            if key is None or not key.activated:
                raise NotFound(f"key {binding.key_id!r} is not held by provider {self._id.provider_id}")
            if key.destroyed:
                raise FailedPrecondition(f"key {binding.key_id} was destroyed; its share no longer exists")
            if key.population_name != policy.population_name:
                self._refuse(binding, "the key belongs to another population than the access policy")
            if policy.dp is not None:
                _check_majority(key)
            jti = str(claims["jti"])
            if jti in state.used_result_ids:
                raise PermissionDenied("this attestation result was already used (replay)")
            decision = ledger.decide(
                state, binding.policy_sha256_hex, policy, binding.round, binding.input_set_sha256_hex, inputs,
                lambda k: _epsilon(policy, k), binding.recipient_public_key, binding.release_number,
            )  # fmt: skip
            for expired in [j for j, e in state.used_result_ids.items() if e <= now.timestamp()]:
                del state.used_result_ids[expired]  # in place: the journal records what changed (keys/keystore.py)
            state.used_result_ids[jti] = int(str(claims["exp"]))
            share = self._store.open_share(key)
            entry.append(_log_fields(self._id.provider_id, policy, binding, inputs, measurement, decision, now))
        context = release_context(binding, self._id.provider_id, key.share_index, jti)
        sealed = hpke.seal(share, hpke.load_public(binding.recipient_public_key), context)
        signed = context + hashlib.sha256(sealed).digest()
        signature = self._id.signing_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        log.info(
            "key_share_released", key_id=binding.key_id, job_id=binding.job_id, round=binding.round,
            repeat=decision.repeat, epsilon_after=decision.epsilon_after,
        )  # fmt: skip
        spent = decision.epsilon_after if policy.dp is not None else None
        return Release(
            self._id.provider_id, key.share_index, sealed, context, signature, decision.repeat, policy.policy_id, spent
        )

    def _screen(self, policy: AccessPolicy, binding: ReleaseBinding) -> None:
        """Before the store's lock, compute the ε the ledger will ask for under it (cached): the policy's charged
        releases so far (a repeat's answer) and the release's number, reached from the count in doubling steps
        (count + 1, + 2, + 4, ...), refusing at the first step over the budget (ε grows with the releases). An
        accountant takes 0.02-1.4 s for each new count (RDP, PRV; 2 cores; PRV's grid grows with the count: a
        million releases asks for 19 GB), and every release of this provider waits on that lock; the number comes
        from counts read over the network, so this bounds the accountant's work by the budget's own capacity,
        whatever number is asked. Should another release be charged meanwhile, the ledger computes what it needs."""
        assert policy.dp is not None
        charged = self._store.read().charged.get(binding.policy_sha256_hex, 0)
        _epsilon(policy, charged)
        number, step = binding.release_number, charged + 1
        while step <= number:
            if ledger.over_budget(policy.dp, eps := _epsilon(policy, step)):
                raise ledger.budget_spent(policy.dp, step, eps, number)
            step = number + 1 if step == number else min(number, charged + 2 * (step - charged))

    def release_count(self, policy_sha256_hex: str) -> int:
        """The highest DP release number this provider has granted under the policy: the releases it charged."""
        self._registered(policy_sha256_hex)
        return self._store.read().charged.get(policy_sha256_hex, 0)

    def _refuse(self, binding: ReleaseBinding, problem: str) -> NoReturn:
        log.warning("key_release_refused", reason=problem, key_id=binding.key_id, job_id=binding.job_id)
        raise PermissionDenied(problem)

    def _appraise(self, binding: ReleaseBinding, token: str) -> dict[str, object]:
        if not token:
            raise PermissionDenied("an attestation result is required to release a key share")
        if len(binding.recipient_public_key) != 32:
            raise InvalidArgument("recipient_public_key", "must be a raw 32-byte X25519 key")
        try:
            claims = verify_result(token, self._policy.verifier_key, self._id.provider_id, self._clock.now())
        except ResultRejected as exc:
            raise PermissionDenied(str(exc)) from None
        checks = [
            (claims.get("fedcompute.hwmodel") in self._policy.allowed_hwmodels, "hardware model is not allowed"),
            (claims.get("fedcompute.dbgstat") != "enabled", "the aggregator runs with debugging enabled"),
            (
                claims.get("fedcompute.measurement") in self._policy.allowed_measurements,
                "the aggregator's code measurement is not an allowed one",
            ),
            (claims.get("fedcompute.binding") == binding.digest(), "attestation result is bound to another request"),
            (
                _confirmed_key(claims) == b64url(binding.recipient_public_key),
                "attestation result confirms another recipient key",
            ),
        ]
        for ok, problem in checks:
            if not ok:
                self._refuse(binding, problem)
        return claims


def _check_majority(key: StoredKey) -> None:
    """DP releases need a key held t of n with t > n/2: any two sets of t key services then share one, which is
    what makes the release numbers count every release (keys/ledger.py); two disjoint sets could each release,
    each numbering its own."""
    held = common_pb2.PublicKey.FromString(bytes.fromhex(key.statement_hex))
    if 2 * held.threshold <= len(held.provider_ids):
        raise FailedPrecondition(
            f"key {key.key_id} is held {held.threshold} of {len(held.provider_ids)}: a DP access policy needs a key "
            "that more than half of its key services must release (t > n/2), or two disjoint sets of them could "
            "each release and neither count the other's releases against the budget"
        )


def _stored_policy(stored: str) -> AccessPolicy:
    """A policy as the keystore keeps it (its message, hex)."""
    return access_policy.from_message(common_pb2.AccessPolicy.FromString(bytes.fromhex(stored)))


@lru_cache(maxsize=256)
def _epsilon_cached(z: float, q: float, releases: int, delta: float, accountant: str) -> float:
    return epsilon(z, q, releases, delta, accountant)


def _epsilon(policy: AccessPolicy, releases: int) -> float:
    assert policy.dp is not None
    dp = policy.dp
    return _epsilon_cached(dp.noise_multiplier, dp.sample_rate, releases, dp.delta, dp.accountant)


def _log_fields(
    provider_id: str,
    policy: AccessPolicy,
    binding: ReleaseBinding,
    inputs: list[tuple[str, str]],
    measurement: str,
    decision: ledger.Decision,
    now: datetime,
) -> dict[str, object]:
    return {
        "v": 2,
        "provider_id": provider_id,
        "time_unix": int(now.timestamp()),
        "policy_sha256": binding.policy_sha256_hex,
        "population": policy.population_name,
        "task_id": binding.task_id,
        "round": binding.round,
        "aggregation_id": binding.aggregation_id,
        "key_id": binding.key_id,
        "input_set_sha256": binding.input_set_sha256_hex,
        "inputs": [[a, e] for a, e in sorted(inputs)],
        "measurement": measurement,
        "repeat": decision.repeat,
        "releases_charged": decision.releases_charged,
        "epsilon_after": decision.epsilon_after,
        # the attempt (its recipient key and job) and its number: an auditor checks each number names one attempt
        "job_id": binding.job_id,
        "recipient": binding.recipient_public_key.hex(),
        "release_number": binding.release_number,
    }


def _confirmed_key(claims: dict[str, object]) -> object:
    cnf = claims.get("cnf")
    jwk = cnf.get("jwk") if isinstance(cnf, dict) else None
    return jwk.get("x") if isinstance(jwk, dict) else None
