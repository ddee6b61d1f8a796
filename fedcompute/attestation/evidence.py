"""Evidence handlers: turn one evidence format into verified claims, or refuse it.

``LocalEvidenceHandler`` appraises the local launcher's EAT (ES256 JWT signed by the launcher's attestation key,
which a local "platform CA" endorses). ``ConfidentialSpaceHandler`` appraises Google Confidential Space OIDC
tokens (RS256, verified against a JWKS). Both yield the same ``VerifiedClaims``; policy is applied elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

LOCAL_FORMAT = "fedcompute.local-eat.v1"
CONFIDENTIAL_SPACE_FORMAT = "gcp.confidential-space.oidc"
LOCAL_HWMODEL = "LOCAL_SOFTWARE"
CONFIDENTIAL_SPACE_ISSUER = "https://confidentialcomputing.googleapis.com"
MAX_SKEW_S = 60


@dataclass(frozen=True)
class VerifiedClaims:
    nonces: tuple[str, ...]
    measurement: str
    hwmodel: str
    dbgstat: str
    swname: str


class EvidenceRejected(Exception):
    """Evidence that does not verify; the message says why."""


class EvidenceHandler(Protocol):
    def verify(self, evidence: str, now: datetime) -> VerifiedClaims: ...


def _decode(token: str, key: Any, algorithm: str, now: datetime, **kwargs: Any) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            **kwargs,
        )
    except jwt.InvalidTokenError as exc:
        raise EvidenceRejected(f"evidence does not verify: {exc}") from None
    stamp = int(now.timestamp())
    if int(claims.get("exp", 0)) <= stamp:
        raise EvidenceRejected("evidence has expired")
    if int(claims.get("iat", 0)) > stamp + MAX_SKEW_S or int(claims.get("nbf", 0)) > stamp + MAX_SKEW_S:
        raise EvidenceRejected("evidence is not valid yet")
    return claims


def _nonces(claims: Mapping[str, Any]) -> tuple[str, ...]:
    raw = claims.get("eat_nonce", [])
    values = [raw] if isinstance(raw, str) else list(raw)
    return tuple(str(v) for v in values)


class LocalEvidenceHandler:
    """Local launcher evidence: endorsement (platform CA -> attestation key), then the evidence itself.

    The hardware model is always ``LOCAL_HWMODEL``: the evidence's own ``hwmodel`` claim is ignored.
    """

    def __init__(self, platform_ca: ec.EllipticCurvePublicKey) -> None:
        self._ca = platform_ca

    def verify(self, evidence: str, now: datetime) -> VerifiedClaims:
        try:
            header = jwt.get_unverified_header(evidence)
        except jwt.InvalidTokenError as exc:
            raise EvidenceRejected(f"evidence is not a JWT: {exc}") from None
        endorsement = _decode(str(header.get("x-endorsement", "")), self._ca, "ES256", now)
        try:
            ak = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(endorsement["ak"]))
        except (KeyError, ValueError, jwt.InvalidKeyError) as exc:
            raise EvidenceRejected(f"endorsement carries no usable attestation key: {exc}") from None
        claims = _decode(evidence, ak, "ES256", now)
        return VerifiedClaims(
            nonces=_nonces(claims),
            measurement=str(claims.get("submods", {}).get("container", {}).get("image_digest", "")),
            # A software launcher's key proves nothing about hardware, whatever its evidence claims: a forged
            # "GCP_INTEL_TDX" must never satisfy a policy that only accepts hardware TEEs.
            hwmodel=LOCAL_HWMODEL,
            dbgstat=str(claims.get("dbgstat", "")),
            swname=str(claims.get("swname", "")),
        )


class ConfidentialSpaceHandler:
    """Confidential Space OIDC attestation tokens, verified against the issuer's JWKS."""

    def __init__(self, jwks: Mapping[str, Any], audience: str, issuer: str = CONFIDENTIAL_SPACE_ISSUER) -> None:
        self._keys = jwt.PyJWKSet.from_dict(dict(jwks))
        self._audience = audience
        self._issuer = issuer

    def verify(self, evidence: str, now: datetime) -> VerifiedClaims:
        try:
            kid = jwt.get_unverified_header(evidence).get("kid")
            key = next(k for k in self._keys.keys if k.key_id == kid)
        except (jwt.InvalidTokenError, StopIteration):
            raise EvidenceRejected("token is not signed by a key in the Confidential Space JWKS") from None
        claims = _decode(evidence, key, "RS256", now, audience=self._audience, issuer=self._issuer)
        if claims.get("swname") != "CONFIDENTIAL_SPACE":
            raise EvidenceRejected(f"swname is {claims.get('swname')!r}, not CONFIDENTIAL_SPACE")
        submods = claims.get("submods", {})
        support = submods.get("confidential_space", {}).get("support_attributes", [])
        if "STABLE" not in support:
            raise EvidenceRejected("the Confidential Space image is not a supported (STABLE) production image")
        return VerifiedClaims(
            nonces=_nonces(claims),
            measurement=str(submods.get("container", {}).get("image_digest", "")),
            hwmodel=str(claims.get("hwmodel", "")),
            dbgstat=str(claims.get("dbgstat", "")),
            swname=str(claims.get("swname", "")),
        )
