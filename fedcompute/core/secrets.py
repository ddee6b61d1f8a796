"""Secrets a deployment may leave unset: generated once into the workdir (mode 0600) and reused.

Torch-free and gRPC-free, as every component reads its credentials from here at start.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.core.files import create_once
from fedcompute.core.settings import Settings


def load_or_create(path: Path) -> str:
    """Read the secret, or create it (durably); processes racing to create it all end up with the one written
    first. A secret made anew after a power cut would orphan what used it."""
    if path.exists():
        return path.read_text().strip()
    return create_once(path, secrets.token_urlsafe(32).encode()).decode().strip()


def load_or_create_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An ES256 signing key kept as PEM (mode 0600); created on first use, durably and whole (a half-written key
    would stop its component from starting; one made anew would invalidate what the old one signed)."""
    if path.exists():
        pem = path.read_bytes()
    else:
        made = ec.generate_private_key(ec.SECP256R1())
        pem = made.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        pem = create_once(path, pem)  # another process's key if it created one first
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return key


def worker_token(settings: Settings) -> str:
    """What aggregator workers present to the server (server and workers hold it; key services never accept it)."""
    return settings.internal_token or load_or_create(settings.server_dir() / "secrets" / "worker-token")


def token_secret(settings: Settings) -> str:
    """The server's HMAC secret for session and upload tokens (the server only)."""
    return settings.token_secret or load_or_create(settings.server_dir() / "secrets" / "token-secret")


def key_admin_token(settings: Settings) -> str:
    """The operator's credential for key-service administration (dealer, task creation; never the server)."""
    return settings.key_admin_token or load_or_create(settings.operator_dir() / "key-admin-token")


def operator_token(settings: Settings) -> str:
    """The operator's bearer token for TaskManagementService (CLI, dealer); `up` registers it as an admin token."""
    return settings.operator_token or load_or_create(settings.operator_dir() / "operator-token")
