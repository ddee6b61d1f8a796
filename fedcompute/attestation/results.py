"""Attestation results (ES256 JWT, EAT/EAR claim names) and the binding nonce that ties them to one release.

binding = sha256("fedcompute/release-binding/v3\0" || lp(recipient public key) || lp(key id) || lp(task id)
|| u64(round) || lp(aggregation id) || lp(job id) || lp(input set sha256) || lp(policy sha256)
|| u64(release number)), base64url: the worker puts it in its evidence as eat_nonce[1], the verifier copies it into
the result, and each key service recomputes it from the release request.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.core.errors import InvalidArgument

EAR_PROFILE = "tag:github.com,2023:veraison/ear"
RESULT_LIFETIME = timedelta(minutes=5)
SUBMOD = "aggregator"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class BindingFields(Protocol):
    """The request fields a binding covers (AttestRequest and ReleaseKeyShareRequest both carry them)."""

    recipient_public_key: bytes
    key_id: str
    task_id: str
    round: int
    aggregation_id: str
    aggregation_job_id: str
    input_set_sha256_hex: str
    policy_sha256_hex: str
    release_number: int


@dataclass(frozen=True)
class ReleaseBinding:
    recipient_public_key: bytes
    key_id: str
    task_id: str
    round: int
    aggregation_id: str
    job_id: str
    input_set_sha256_hex: str
    policy_sha256_hex: str
    # under a DP policy, which of its releases this attempt is, counted over every key service (keys/ledger.py)
    release_number: int = 0

    @classmethod
    def of(cls, msg: BindingFields) -> ReleaseBinding:
        """The binding a request names; ``InvalidArgument`` for a field the digest cannot encode (a negative round,
        a field over 65,535 bytes), which would otherwise fail as an internal error."""
        if msg.round < 0:
            raise InvalidArgument("round", f"must be 0 or more, not {msg.round}")
        for name in ("recipient_public_key", "key_id", "task_id", "aggregation_id", "aggregation_job_id",
                     "input_set_sha256_hex", "policy_sha256_hex"):  # fmt: skip
            value = getattr(msg, name)
            if len(value if isinstance(value, bytes) else value.encode()) > 0xFFFF:
                raise InvalidArgument(name, "is over 65,535 bytes")
        return cls(
            msg.recipient_public_key,
            msg.key_id,
            msg.task_id,
            msg.round,
            msg.aggregation_id,
            msg.aggregation_job_id,
            msg.input_set_sha256_hex,
            msg.policy_sha256_hex,
            msg.release_number,
        )

    def fields(self) -> dict[str, Any]:
        """Keyword arguments for the request messages that carry a binding."""
        return {
            "recipient_public_key": self.recipient_public_key,
            "key_id": self.key_id,
            "task_id": self.task_id,
            "round": self.round,
            "aggregation_id": self.aggregation_id,
            "aggregation_job_id": self.job_id,
            "input_set_sha256_hex": self.input_set_sha256_hex,
            "policy_sha256_hex": self.policy_sha256_hex,
            "release_number": self.release_number,
        }

    def digest(self) -> str:
        parts = [b"fedcompute/release-binding/v3\x00"]
        for raw in (self.recipient_public_key, self.key_id.encode(), self.task_id.encode()):
            parts.append(struct.pack(">H", len(raw)) + raw)
        parts.append(struct.pack(">Q", self.round))
        for text in (self.aggregation_id, self.job_id, self.input_set_sha256_hex, self.policy_sha256_hex):
            raw = text.encode()
            parts.append(struct.pack(">H", len(raw)) + raw)
        parts.append(struct.pack(">Q", self.release_number))
        return b64url(hashlib.sha256(b"".join(parts)).digest())


@dataclass(frozen=True)
class Appraisal:
    """What a verifier concluded about one piece of evidence."""

    measurement: str
    hwmodel: str
    dbgstat: str
    policy_id: str


def mint_result(
    signing_key: ec.EllipticCurvePrivateKey,
    verifier_id: str,
    audience: list[str],
    appraisal: Appraisal,
    binding: str,
    recipient: bytes,
    now: datetime,
    jti: str,
) -> str:
    claims = {
        "iss": verifier_id,
        "aud": audience,
        "iat": int(now.timestamp()),
        "exp": int((now + RESULT_LIFETIME).timestamp()),
        "jti": jti,
        "eat_profile": EAR_PROFILE,
        "ear.verifier-id": {"developer": "fedcompute", "build": "0.1.0"},
        "submods": {SUBMOD: {"ear.status": "affirming", "ear.appraisal-policy-id": appraisal.policy_id}},
        "fedcompute.measurement": appraisal.measurement,
        "fedcompute.hwmodel": appraisal.hwmodel,
        "fedcompute.dbgstat": appraisal.dbgstat,
        "fedcompute.binding": binding,
        "cnf": {"jwk": {"kty": "OKP", "crv": "X25519", "x": b64url(recipient)}},
    }
    return jwt.encode(claims, signing_key, algorithm="ES256")


class ResultRejected(Exception):
    """An attestation result that a relying party must not act on; the message says why."""


def verify_result(token: str, verifier_key: ec.EllipticCurvePublicKey, audience: str, now: datetime) -> dict[str, Any]:
    """Signature, audience, expiry (at ``now``) and the EAR status; the caller checks policy and binding."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            verifier_key,
            algorithms=["ES256"],
            audience=audience,
            options={"require": ["exp", "iat", "jti", "aud", "iss"], "verify_exp": False, "verify_iat": False},
        )  # times are checked below against the injected clock
    except jwt.InvalidTokenError as exc:
        raise ResultRejected(f"attestation result is not valid: {exc}") from None
    if int(claims["exp"]) <= int(now.timestamp()):
        raise ResultRejected("attestation result has expired")
    if int(claims["iat"]) > int(now.timestamp()) + 60:
        raise ResultRejected("attestation result is issued in the future")
    status = claims.get("submods", {}).get(SUBMOD, {}).get("ear.status")
    if status != "affirming":
        raise ResultRejected(f"attestation result status is {status!r}, not 'affirming'")
    return claims
