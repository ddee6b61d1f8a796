"""HPKE (RFC 9180) base mode, single shot: DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305.

The suite ODP devices use, via ``cryptography``'s HPKE. Output layout: enc (32 bytes) || ciphertext || tag.
"""

from __future__ import annotations

import base64
import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

KEM_ID = 0x0020
KDF_ID = 0x0001
AEAD_ID = 0x0003
ENC_BYTES = 32
TAG_BYTES = 16
_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)


class DecryptionError(Exception):
    """The ciphertext does not open under this key and info (wrong key, wrong context or tampered)."""


def generate_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def load_public(raw: bytes) -> X25519PublicKey:
    if len(raw) != 32:
        raise ValueError(f"an X25519 public key is 32 bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def load_private(raw: bytes) -> X25519PrivateKey:
    if len(raw) != 32:
        raise ValueError(f"an X25519 private key is 32 bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def seal(plaintext: bytes, recipient: X25519PublicKey, info: bytes) -> bytes:
    return _SUITE.encrypt(plaintext, recipient, info=info)


def open_sealed(ciphertext: bytes | memoryview, key: X25519PrivateKey, info: bytes) -> bytes:
    if len(ciphertext) < ENC_BYTES + TAG_BYTES:
        raise DecryptionError("ciphertext shorter than an HPKE encapsulation and tag")
    try:
        return _SUITE.decrypt(ciphertext, key, info=info)
    except (InvalidTag, ValueError) as exc:
        raise DecryptionError("HPKE open failed: wrong key, wrong context, or tampered ciphertext") from exc


def key_id_for(public_key: bytes) -> str:
    """Self-certifying key id: base64url(sha256(label || suite ids || public key)), 22 characters."""
    digest = hashlib.sha256(b"fedcompute/kid/v1\x00" + struct.pack(">HHH", KEM_ID, KDF_ID, AEAD_ID) + public_key)
    return "k_" + base64.urlsafe_b64encode(digest.digest()).decode()[:22]
