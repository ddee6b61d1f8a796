"""Composition root of the verifier service (and the local platform CA the launcher's key is endorsed by).

Where the keys live (workdir-relative): ``attest/platform-ca.pem`` (private, launcher only), ``verifier/verifier.pem``
(private, verifier only), ``public/`` (their public keys: what the verifier and the key services read).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from fedcompute.attestation.evidence import (
    CONFIDENTIAL_SPACE_FORMAT,
    LOCAL_FORMAT,
    ConfidentialSpaceHandler,
    EvidenceHandler,
    LocalEvidenceHandler,
)
from fedcompute.attestation.policy import (
    allowed_hwmodels,
    allowed_measurements,
    public_dir,
    read_public_key,
    verifier_public_key_path,
    write_public_key,
)
from fedcompute.attestation.verifier import AppraisalPolicy, Verifier, VerifierServicer
from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.logs import VERSION
from fedcompute.core.secrets import load_or_create_ec_key
from fedcompute.core.settings import Settings
from fedcompute.rpc.metrics import announce, process_registry
from fedcompute.rpc.serving import GrpcServer, build_grpc_server
from fedcompute.v1 import verifier_pb2, verifier_pb2_grpc

log = structlog.get_logger("fedcompute.attestation")
LOCAL_REFUSED_IN_PRODUCTION = (
    f"evidence format {LOCAL_FORMAT} is not accepted under the production policy: it comes from a software "
    "launcher, not a hardware TEE. Run the aggregator in Confidential Space "
    f"(evidence format {CONFIDENTIAL_SPACE_FORMAT}; set confidential_space_jwks_file on the verifier), or use "
    "attestation_policy=development (FEDCOMPUTE_ATTESTATION_POLICY) for local testing only"
)


def platform_ca_key_path(settings: Settings) -> Path:
    """The platform CA's private key: only the aggregator launcher (the attester side) reads it."""
    return settings.workdir / "attest" / "platform-ca.pem"


def platform_ca_public_path(settings: Settings) -> Path:
    """The platform CA's public key: all the verifier needs to check launcher endorsements."""
    return public_dir(settings) / "platform-ca-public.pem"


def platform_ca(settings: Settings) -> ec.EllipticCurvePrivateKey:
    """The local stand-in for a hardware vendor's root: it endorses launcher attestation keys.

    Launcher side only: loads (or creates) the private key and publishes its public key for the verifier.
    """
    path = platform_ca_key_path(settings)
    _private_dir(path.parent)
    _warn_if_left_over(settings.workdir / "secrets" / "platform-ca.pem", path)
    key = load_or_create_ec_key(path)
    write_public_key(platform_ca_public_path(settings), key.public_key())
    return key


def ensure_platform_ca(settings: Settings) -> ec.EllipticCurvePrivateKey:
    """Make sure the platform CA exists and its public key is published (call before ``build_verifier``)."""
    return platform_ca(settings)


def verifier_key_path(settings: Settings) -> Path:
    return settings.workdir / "verifier" / "verifier.pem"


def verifier_key(settings: Settings) -> ec.EllipticCurvePrivateKey:
    path = verifier_key_path(settings)
    _private_dir(path.parent)
    _warn_if_left_over(settings.workdir / "secrets" / "verifier.pem", path)
    key = load_or_create_ec_key(path)
    write_public_key(verifier_public_key_path(settings), key.public_key())
    return key


def platform_ca_public_key(settings: Settings) -> ec.EllipticCurvePublicKey:
    path = platform_ca_public_path(settings)
    if not path.exists():
        raise FileNotFoundError(
            f"the platform CA public key {path} does not exist, so local launcher evidence cannot be checked: "
            "start the aggregator launcher on this workdir first (`fedcompute serve aggregator` or `fedcompute up`), "
            "or copy the launcher host's <workdir>/public/platform-ca-public.pem to that path"
        )
    return read_public_key(path)


def build_verifier(settings: Settings, clock: Clock, ids: IdGenerator, audience: list[str]) -> Verifier:
    """Production accepts hardware TEE evidence only: local-launcher evidence is not even parsed."""
    handlers: dict[str, EvidenceHandler] = {}
    refused: dict[str, str] = {}
    if settings.attestation_policy == "production":
        refused[LOCAL_FORMAT] = LOCAL_REFUSED_IN_PRODUCTION
    else:
        handlers[LOCAL_FORMAT] = LocalEvidenceHandler(platform_ca_public_key(settings))
    if settings.confidential_space_jwks_file:
        jwks = json.loads(settings.confidential_space_jwks_file.read_text())
        handlers[CONFIDENTIAL_SPACE_FORMAT] = ConfidentialSpaceHandler(jwks, settings.confidential_space_audience)
    policy = AppraisalPolicy(allowed_measurements(settings), allowed_hwmodels(settings))
    return Verifier(handlers, policy, verifier_key(settings), audience, clock, ids, refused_formats=refused)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _warn_if_left_over(old: Path, new: Path) -> None:
    if old.exists():
        log.warning(
            "private_key_left_over",
            path=str(old),
            now_at=str(new),
            hint="this key is no longer read from there; delete it",
        )


def build_verifier_server(
    settings: Settings, verifier: Verifier, registry: CollectorRegistry | None = None
) -> GrpcServer:
    registry = registry if registry is not None else process_registry()
    announce(registry, "verifier", VERSION)
    registrations = [
        (
            verifier_pb2_grpc.add_VerifierServiceServicer_to_server,
            VerifierServicer(verifier),
            verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name,
        )
    ]
    return build_grpc_server(
        settings, "verifier", "verifier_port", registrations, registry, threads=8, max_receive_bytes=1024 * 1024
    )  # evidence and a binding: kilobytes; anyone may send one, and parsing a message costs ~30x its size
