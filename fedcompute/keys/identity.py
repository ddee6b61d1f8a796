"""A key provider's long-term identity: ES256 signing key and X25519 share-wrapping key.

Kept in the provider's own directory (mode 0600), created on first start. The KEK that seals its shares is not
part of it: it comes from a separate secret (``keys/kek.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcompute.core.files import create_once
from fedcompute.keys import hpke


@dataclass(frozen=True)
class ProviderIdentity:
    provider_id: str
    signing_key: ec.EllipticCurvePrivateKey
    wrapping_key: X25519PrivateKey

    @property
    def wrapping_public(self) -> bytes:
        return hpke.public_bytes(self.wrapping_key.public_key())


def load_identity(folder: Path, provider_id: str) -> ProviderIdentity | None:
    """The provider's identity from its directory; None if it has none yet."""
    path = folder / "identity.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if data["provider_id"] != provider_id:
        raise ValueError(f"{path} belongs to provider {data['provider_id']!r}, not {provider_id!r}")
    signing = serialization.load_pem_private_key(data["signing_key_pem"].encode(), password=None)
    assert isinstance(signing, ec.EllipticCurvePrivateKey)
    return ProviderIdentity(provider_id, signing, hpke.load_private(bytes.fromhex(data["wrapping_key"])))


def load_or_create_identity(folder: Path, provider_id: str) -> ProviderIdentity:
    """The provider's identity, created on first use. The file appears whole or not at all (written to a temporary
    file, synced, then linked to its name): a process killed while creating it leaves no empty identity behind,
    and of two processes creating it at once the first link wins and the other reads it."""
    found = load_identity(folder, provider_id)
    if found is not None:
        return found
    identity = ProviderIdentity(provider_id, ec.generate_private_key(ec.SECP256R1()), hpke.generate_private_key())
    pem = identity.signing_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    body = {
        "provider_id": provider_id,
        "signing_key_pem": pem,
        "wrapping_key": hpke.private_bytes(identity.wrapping_key).hex(),
    }
    data = json.dumps(body).encode()
    # durable and whole: an identity made anew after a power cut would not match the signing key others pinned
    if create_once(folder / "identity.json", data) != data:  # another process created it first: theirs
        won = load_identity(folder, provider_id)
        assert won is not None
        return won
    return identity
