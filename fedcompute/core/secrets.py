"""Secrets a deployment may leave unset: generated once into the workdir (mode 0600) and reused.

Torch-free and gRPC-free, as every component reads its credentials from here at start.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.core.files import fsync_directory
from fedcompute.core.settings import Settings


def load_or_create(path: Path) -> str:
    """Read the secret, or create it; processes racing to create it all end up with the one written first."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-")
    with os.fdopen(fd, "w") as handle:  # mkstemp files are 0600
        handle.write(value)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)  # atomic: fails if another process got there first
    except FileExistsError:
        value = path.read_text().strip()
    finally:
        os.unlink(tmp)
    fsync_directory(path.parent)  # the name survives a power cut: a secret made anew would orphan what used it
    return value


def load_or_create_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An ES256 signing key kept as PEM (mode 0600); created on first use."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
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
