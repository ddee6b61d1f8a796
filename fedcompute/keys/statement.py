"""The canonical key statement every provider signs, and the check devices and workers run on a relayed key."""

from __future__ import annotations

import struct
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.core.policy import dp_quorum_violations
from fedcompute.v1 import common_pb2

MAGIC = b"fedcompute/public-key/v1\x00"


class UntrustedKey(Exception):
    """A relayed public key lacks enough valid signatures from the providers this party trusts."""


def _lp(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


def statement_bytes(key: common_pb2.PublicKey) -> bytes:
    """Everything about a key that a signature vouches for (signatures themselves excluded)."""
    parts = [
        MAGIC,
        _lp(key.key_id.encode()),
        _lp(key.public_key),
        struct.pack(">HHH", key.kem_id, key.kdf_id, key.aead_id),
        struct.pack(">qqq", key.activation_time_unix, key.expiration_time_unix, key.destruction_time_unix),
        _lp(key.population_name.encode()),
        struct.pack(">BB", key.threshold, len(key.provider_ids)),
    ]
    parts += [_lp(p.encode()) for p in key.provider_ids]
    return b"".join(parts)


def sign(key: common_pb2.PublicKey, signing_key: ec.EllipticCurvePrivateKey) -> bytes:
    return sign_bytes(statement_bytes(key), signing_key)


def sign_bytes(data: bytes, signing_key: ec.EllipticCurvePrivateKey) -> bytes:
    """ES256 (DER) over canonical bytes that carry their own domain-separating magic."""
    return signing_key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_signature(data: bytes, signature: bytes, public_key: ec.EllipticCurvePublicKey) -> bool:
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def load_signing_public(der: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("a provider signing key must be an EC P-256 public key")
    return key


def public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_trusted(key: common_pb2.PublicKey, trusted: Mapping[str, ec.EllipticCurvePublicKey], threshold: int) -> None:
    """Raise ``UntrustedKey`` unless ``threshold`` distinct trusted providers validly signed this statement."""
    try:
        data = statement_bytes(key)
    except (struct.error, ValueError):
        raise UntrustedKey(f"key {key.key_id!r} has fields out of range; it cannot have been signed") from None
    valid = {
        s.provider_id
        for s in key.signatures
        if s.provider_id in trusted and verify_signature(data, s.signature, trusted[s.provider_id])
    }
    unknown = sorted({s.provider_id for s in key.signatures} - set(trusted))
    if len(valid) < threshold:
        detail = f"; signed by unknown providers {unknown}" if unknown else ""
        raise UntrustedKey(
            f"key {key.key_id} has {len(valid)} valid signature(s) from trusted providers, {threshold} needed{detail}"
        )


def check_dp_holders(key: common_pb2.PublicKey, trusted: Mapping[str, ec.EllipticCurvePublicKey]) -> None:
    """Raise ``UntrustedKey`` unless this key may carry a device's contributions to a DP task: held only by
    providers the device pins, by a majority of them (``core.policy.dp_quorum_violations``), and signed by every
    holder (a holder that did not sign could be anyone's: two quorums meeting only there would not meet)."""
    problems = dp_quorum_violations(key.provider_ids, key.threshold, trusted)
    if problems:
        raise UntrustedKey("; ".join(problems))
    check_trusted(key, {p: trusted[p] for p in key.provider_ids}, len(set(key.provider_ids)))
