"""Policies shared by the verifier and the key services, derived from settings."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.attestation.evidence import LOCAL_HWMODEL
from fedcompute.attestation.measure import measure
from fedcompute.core.settings import Settings

HARDWARE_TEES = frozenset({"GCP_AMD_SEV", "GCP_AMD_SEV_ES", "GCP_INTEL_TDX"})


def allowed_hwmodels(settings: Settings) -> frozenset[str]:
    """Production accepts hardware TEEs only; development also accepts the local software launcher."""
    if settings.attestation_policy == "production":
        return HARDWARE_TEES
    return HARDWARE_TEES | {LOCAL_HWMODEL}


def allowed_measurements(settings: Settings) -> frozenset[str]:
    """The reference values: configured, or (development default) this installation's own aggregator code."""
    return frozenset(settings.allowed_measurements or [measure()])


def public_dir(settings: Settings) -> Path:
    """Public keys only (verifier, platform CA): safe to copy to, or mount in, any other component."""
    return settings.workdir / "public"


def verifier_public_key_path(settings: Settings) -> Path:
    return public_dir(settings) / "verifier-public.pem"


def write_public_key(path: Path, key: ec.EllipticCurvePublicKey) -> None:
    """Write (temp file, then rename) so a reader in another process never sees half a key."""
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if path.exists() and path.read_bytes() == pem:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_bytes(pem)
    os.replace(temp, path)


def read_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} is not an EC public key")
    return key
