"""Obtaining a population key inside the attested worker.

For each key id a job needs: a fresh ephemeral X25519 key; a verifier challenge; evidence from the launcher
carrying (challenge, binding of this exact release request); an attestation result; then every key service's
share, each HPKE-sealed to the ephemeral key and signed. Any t shares rebuild the key, which must derive the
published (t-signed) public key; other t-subsets are tried when more than t arrived, and providers whose
shares never fit are reported. The key lives in this object only; nothing is written anywhere.

Under a DP access policy the attempt numbers its release (``release_number``, in the binding): one past the
highest count the key services report, the same number for every key id it asks; a key service that has granted
as high a number meanwhile refuses it as stale, and the attempt reads the counts again and asks anew, under a new
attestation result (``NUMBER_TRIES`` times at most). Shares are only ever combined from one binding.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import grpc
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcompute.aggregator.contributions import Rejected
from fedcompute.attestation.evidence import LOCAL_FORMAT
from fedcompute.attestation.results import ReleaseBinding
from fedcompute.clients.typed import KeyClient, VerifierClient
from fedcompute.keys import hpke, statement
from fedcompute.keys.ledger import MAX_RELEASE_NUMBER
from fedcompute.keys.service import release_context
from fedcompute.keys.shamir import combine_key
from fedcompute.rpc.errors import BUDGET_REFUSAL, REFUSAL_KEY, STALE_REFUSAL
from fedcompute.v1 import aggregation_pb2, common_pb2, key_pb2, verifier_pb2

log = structlog.get_logger("fedcompute.aggregator")


class KeyUnavailable(Exception):
    """Not enough key services released a valid share right now (retry the job later)."""


class KeyRefused(Exception):
    """Key services refused the release under their ledger (policy, input set, budget): retrying cannot help."""


class BudgetExhausted(KeyRefused):
    """A key service refused the release because the task's privacy budget is spent (RESOURCE_EXHAUSTED): no
    later attempt of this task can be released either."""


REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)
NUMBER_TRIES = 3  # numbers asked for one key id before the job is retried later (each time another release ran)


@dataclass
class KeyAccess:
    """Everything a worker needs to obtain keys: key services, whom to trust, the verifier and its attester."""

    providers: list[KeyClient]
    trusted: Mapping[str, ec.EllipticCurvePublicKey]
    threshold: int
    verifier: VerifierClient
    evidence: Callable[[list[str]], str]
    evidence_format: str = LOCAL_FORMAT


@dataclass
class JobKeys:
    access: KeyAccess
    job: aggregation_pb2.AggregationJob
    policy_sha256_hex: str
    inputs: list[tuple[str, str]]
    numbered: bool = False  # a DP policy: the attempt numbers its release (the module)
    faulty_providers: set[str] = field(default_factory=set)
    _keys: dict[str, X25519PrivateKey] = field(default_factory=dict)
    _failed: dict[str, Exception] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # this attempt's recipient key, for every key id it asks: the key services charge an attempt once (one output)
    _ephemeral: X25519PrivateKey = field(default_factory=hpke.generate_private_key)
    _number: int = 0  # the attempt's release number once it has one (numbered only)

    def __call__(self, key_id: str) -> X25519PrivateKey:
        """The key, obtained once per job however many threads open at once (the worker opens on two): each
        release request spends the key services' release budgets. A failure to obtain it is kept and raised again
        to later callers of this job, never asked again (a refusal of the key itself, ``Rejected``, is not kept:
        it asks the providers' public keys only, no release)."""
        with self._lock:
            if key_id in self._failed:
                raise self._failed[key_id]
            if key_id not in self._keys:
                try:
                    self._keys[key_id] = self._obtain(key_id)
                except Rejected:
                    raise
                except Exception as exc:
                    self._failed[key_id] = exc
                    raise
            return self._keys[key_id]

    def _published(self, key_id: str) -> common_pb2.PublicKey:
        for client in self.access.providers:
            try:
                keys = client.get_public_keys(key_pb2.GetPublicKeysRequest(population_name=self.job.population_name))
            except grpc.RpcError:
                continue
            for key in keys.keys:
                if key.key_id == key_id:
                    try:
                        statement.check_trusted(key, self.access.trusted, self.access.threshold)
                    except statement.UntrustedKey:
                        raise Rejected("untrusted_key") from None
                    return key
            raise Rejected("unknown_key")
        raise KeyUnavailable("no key service answered GetPublicKeys")

    def _obtain(self, key_id: str) -> X25519PrivateKey:
        published = self._published(key_id)
        needed = max(self.access.threshold, published.threshold)  # the key's own t, signed: never fewer shares
        providers = [c for c in self.access.providers if c.reachable()]
        if len(providers) < needed:
            # Asking for releases now would only spend the live providers' release budgets.
            raise KeyUnavailable(
                f"only {len(providers)} of {len(self.access.providers)} key services are reachable, "
                f"{needed} needed; waiting for them to come back"
            )
        ephemeral = self._ephemeral
        for _ in range(NUMBER_TRIES if self.numbered else 1):
            binding = ReleaseBinding(
                hpke.public_bytes(ephemeral.public_key()),
                key_id,
                self.job.task_id,
                self.job.round,
                self.job.aggregation_id,
                self.job.job_id,
                self.job.input_set_sha256_hex,
                self.policy_sha256_hex,
                self._numbered(providers),
            )
            result = self._attest(binding)
            result_id = str(jwt.decode(result, options={"verify_signature": False})["jti"])
            shares, errors, refused = self._collect(providers, binding, result, result_id, ephemeral)
            if len(shares) >= needed or STALE_REFUSAL not in refused:
                break
            self._number = 0  # another release took its number meanwhile: read the counts again
        if len(shares) < needed and STALE_REFUSAL in refused:
            raise KeyUnavailable(
                f"key services kept granting other releases the number this attempt asked with "
                f"({NUMBER_TRIES} tries); retrying later ({'; '.join(errors)})"
            )
        if len(shares) < needed and refused:
            # spent for good only if too few key services are left that have not said so: the number was read
            # from counts that may have been raised on the way (unsigned), and one that was away can be asked later
            spent = refused.count(BUDGET_REFUSAL)
            refusal = BudgetExhausted if len(self.access.providers) - spent < needed else KeyRefused
            raise refusal(f"key services refused to release a share: {'; '.join(errors)}")
        if len(shares) < needed:
            raise KeyUnavailable(
                f"only {len(shares)} of {len(self.access.providers)} key services released a share, "
                f"{needed} needed ({'; '.join(errors)})"
            )
        return self._rebuild(shares, published)

    def _numbered(self, providers: list[KeyClient]) -> int:
        """The attempt's release number (0 without DP): the one it has, or one past the highest count of the
        key services that answer (a stale count only gets a refusal; a higher one charges more, never less)."""
        if not self.numbered or self._number:
            return self._number
        counts, errors = [], []
        request = key_pb2.GetReleaseCountRequest(policy_sha256_hex=self.policy_sha256_hex)
        for client in providers:
            try:
                counts.append(client.get_release_count(request).releases_charged)
            except grpc.RpcError as exc:  # away, or the policy is not registered there: its release will say so
                errors.append(exc)
        if not counts:
            said = "; ".join(f"{e.code().name}: {e.details()}" for e in errors)
            refused = errors and all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in errors)
            raise (KeyRefused if refused else KeyUnavailable)(f"no key service gave its release count ({said})")
        if max(counts) >= MAX_RELEASE_NUMBER:  # no key service grants past it: raised on the way (not signed)?
            raise KeyRefused(f"a key service reports {max(counts)} releases of the policy, the most there can be")
        self._number = max(counts) + 1
        return self._number

    def _attest(self, binding: ReleaseBinding) -> str:
        try:
            challenge = self.access.verifier.get_challenge(verifier_pb2.GetChallengeRequest())
            try:
                evidence = self.access.evidence([challenge.nonce, binding.digest()])
            except (OSError, RuntimeError, ValueError) as exc:  # the launcher's socket is gone or refused us
                raise KeyUnavailable(f"no evidence from the attester: {exc}") from None
            return self.access.verifier.attest(
                verifier_pb2.AttestRequest(
                    evidence_format=self.access.evidence_format, evidence=evidence, **binding.fields()
                )
            ).attestation_result
        except grpc.RpcError as exc:
            raise KeyUnavailable(f"attestation failed: {exc.code().name}: {exc.details()}") from None

    def _collect(
        self,
        providers: list[KeyClient],
        binding: ReleaseBinding,
        result: str,
        result_id: str,
        ephemeral: X25519PrivateKey,
    ) -> tuple[dict[str, tuple[int, bytes]], list[str], list[str]]:
        """The shares that verified, what went wrong with the others, and the refusals among those, one per key
        service that refused (``REFUSALS``: its ledger said no): ``BUDGET_REFUSAL`` where it said so for the
        budget (its trailer; gRPC's own RESOURCE_EXHAUSTED for a message too large is no budget refusal), else the
        code's name."""
        request = key_pb2.ReleaseKeyShareRequest(
            attestation_result=result,
            inputs=[common_pb2.InputRef(assignment_id=a, envelope_sha256_hex=e) for a, e in self.inputs],
            **binding.fields(),
        )
        shares: dict[str, tuple[int, bytes]] = {}
        errors: list[str] = []
        refused: list[str] = []
        for client in providers:
            try:
                reply = client.release_key_share(request)
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                if exc.code() in REFUSALS:
                    trailers: Sequence[tuple[str, str | bytes]] = (
                        exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
                    ) or ()
                    marked = {value for key, value in trailers if key == REFUSAL_KEY}
                    refusal = next((m for m in (BUDGET_REFUSAL, STALE_REFUSAL) if m in marked), exc.code().name)
                    refused.append(str(refusal))
                continue
            share = self._open(reply, binding, result_id, ephemeral)
            if share is None:
                errors.append(f"{reply.provider_id}: release did not verify")
                self.faulty_providers.add(reply.provider_id)
            else:
                shares[reply.provider_id] = share
        return shares, errors, refused

    def _open(
        self,
        reply: key_pb2.ReleaseKeyShareResponse,
        binding: ReleaseBinding,
        result_id: str,
        ephemeral: X25519PrivateKey,
    ) -> tuple[int, bytes] | None:
        pinned = self.access.trusted.get(reply.provider_id)
        context = release_context(binding, reply.provider_id, reply.share_index, result_id)
        signed = context + hashlib.sha256(reply.encrypted_share).digest()
        if pinned is None or reply.release_context != context:
            return None
        if not statement.verify_signature(signed, reply.signature, pinned):
            return None
        try:
            share = hpke.open_sealed(reply.encrypted_share, ephemeral, context)
        except hpke.DecryptionError:
            return None
        return (reply.share_index, share) if len(share) == 32 else None

    def _rebuild(self, shares: dict[str, tuple[int, bytes]], published: common_pb2.PublicKey) -> X25519PrivateKey:
        needed = max(self.access.threshold, published.threshold)
        # provider_ids[i] holds share index i + 1 (the statement its providers signed): a provider that says
        # otherwise (a second share 1, say) is faulty and left out; its index made every subset with it fail
        holds = {provider: i + 1 for i, provider in enumerate(published.provider_ids)}
        misindexed = {p for p, (index, _) in shares.items() if holds.get(p) != index}
        good: set[str] = set()
        key: X25519PrivateKey | None = None
        for subset in combinations(sorted(set(shares) - misindexed), needed):
            try:
                candidate = hpke.load_private(combine_key([shares[p] for p in subset], needed))
            except ValueError:  # not a key at all: this subset holds a wrong share
                continue
            if hpke.public_bytes(candidate.public_key()) == published.public_key:
                key = key or candidate
                good.update(subset)
        if key is None:
            raise KeyUnavailable(
                f"the shares from {sorted(shares)} do not rebuild the published key {published.key_id}; "
                "at least one of these providers returned a wrong share"
            )
        wrong = set(shares) - good  # (the misindexed among them)
        if wrong:
            self.faulty_providers.update(wrong)
            log.warning("wrong_key_share_detected", providers=sorted(wrong), key_id=published.key_id)
        shares.clear()
        return key
