"""The verifier (RFC 9334): issues single-use challenges, appraises evidence against a reference-value policy,
and issues short-lived attestation results bound to one key-release request."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.attestation.evidence import EvidenceHandler, EvidenceRejected
from fedcompute.attestation.results import Appraisal, ReleaseBinding, b64url, mint_result
from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.errors import InvalidArgument, PermissionDenied
from fedcompute.v1 import verifier_pb2, verifier_pb2_grpc

log = structlog.get_logger("fedcompute.verifier")
CHALLENGE_LIFETIME = timedelta(minutes=2)
MAX_CHALLENGES = 100_000  # outstanding at once (anyone may ask for one): past it the oldest is dropped


@dataclass(frozen=True)
class AppraisalPolicy:
    """Reference values: which code measurements and hardware models are acceptable."""

    allowed_measurements: frozenset[str]
    allowed_hwmodels: frozenset[str]
    policy_id: str = "fedcompute/aggregator/v1"


class Verifier:
    def __init__(
        self,
        handlers: Mapping[str, EvidenceHandler],
        policy: AppraisalPolicy,
        signing_key: ec.EllipticCurvePrivateKey,
        audience: list[str],
        clock: Clock,
        ids: IdGenerator,
        verifier_id: str = "fedcompute-verifier",
        refused_formats: Mapping[str, str] | None = None,
    ) -> None:
        """``refused_formats``: formats this policy refuses outright, each with the message the caller is told."""
        self._handlers = dict(handlers)
        self._refused = dict(refused_formats or {})
        self._policy = policy
        self._key = signing_key
        self._audience = audience
        self._clock = clock
        self._ids = ids
        self._verifier_id = verifier_id
        self._challenges: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def challenge(self) -> tuple[str, datetime]:
        now = self._clock.now()
        nonce = b64url(secrets.token_bytes(16))
        with self._lock:  # oldest first (one lifetime for all): drop the expired from the front, O(1) a call
            while self._challenges and (
                len(self._challenges) >= MAX_CHALLENGES or next(iter(self._challenges.values())) <= now
            ):
                del self._challenges[next(iter(self._challenges))]
            self._challenges[nonce] = now + CHALLENGE_LIFETIME
        return nonce, now + CHALLENGE_LIFETIME

    def attest(self, evidence_format: str, evidence: str, binding: ReleaseBinding) -> str:
        handler = self._handlers.get(evidence_format)
        if handler is None:
            raise self._unaccepted(evidence_format)
        if len(binding.recipient_public_key) != 32:
            raise InvalidArgument("recipient_public_key", "must be a raw 32-byte X25519 key")
        now = self._clock.now()
        try:
            claims = handler.verify(evidence, now)
        except EvidenceRejected as exc:
            raise self._refuse(str(exc)) from None
        if len(claims.nonces) < 2:
            raise self._refuse("evidence must carry the challenge and the request binding as eat_nonce")
        with self._lock:
            expiry = self._challenges.pop(claims.nonces[0], None)
        if expiry is None or expiry <= now:
            raise self._refuse("the evidence's challenge is unknown, expired or already used")
        if claims.nonces[1] != binding.digest():
            raise self._refuse("the evidence is bound to another key-release request")
        if claims.dbgstat == "enabled":
            raise self._refuse("the aggregator runs with debugging enabled")
        if claims.hwmodel not in self._policy.allowed_hwmodels:
            raise self._refuse(f"hardware model {claims.hwmodel!r} is not allowed by this policy")
        if claims.measurement not in self._policy.allowed_measurements:
            raise self._refuse(f"code measurement {claims.measurement} is not an allowed one")
        appraisal = Appraisal(claims.measurement, claims.hwmodel, claims.dbgstat, self._policy.policy_id)
        token = mint_result(
            self._key, self._verifier_id, self._audience, appraisal, binding.digest(),
            binding.recipient_public_key, now, self._ids.new_id("ar"),
        )  # fmt: skip
        log.info("attestation_affirmed", job_id=binding.job_id, hwmodel=claims.hwmodel)
        return token

    def _unaccepted(self, evidence_format: str) -> PermissionDenied | InvalidArgument:
        reason = self._refused.get(evidence_format)
        if reason is not None:
            return self._refuse(reason)
        known = ", ".join(sorted(self._handlers)) or "none"
        return InvalidArgument("evidence_format", f"{evidence_format!r} is not supported; this verifier takes: {known}")

    def _refuse(self, reason: str) -> PermissionDenied:
        log.warning("attestation_refused", reason=reason)
        return PermissionDenied(f"attestation refused: {reason}")


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier

    def GetChallenge(
        self, request: verifier_pb2.GetChallengeRequest, context: grpc.ServicerContext
    ) -> verifier_pb2.GetChallengeResponse:
        nonce, expires = self._verifier.challenge()
        return verifier_pb2.GetChallengeResponse(nonce=nonce, expires_unix=int(expires.timestamp()))

    def Attest(self, request: verifier_pb2.AttestRequest, context: grpc.ServicerContext) -> verifier_pb2.AttestResponse:
        binding = ReleaseBinding.of(request)
        token = self._verifier.attest(request.evidence_format, request.evidence, binding)
        return verifier_pb2.AttestResponse(attestation_result=token)
