"""Composition root of the verifier service (and the local platform CA the launcher's key is endorsed by)."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric import ec

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
    verifier_public_key_path,
    write_public_key,
)
from fedcompute.attestation.verifier import AppraisalPolicy, Verifier, VerifierServicer
from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.secrets import load_or_create_ec_key
from fedcompute.core.settings import Settings
from fedcompute.rpc.metrics import RpcMetrics
from fedcompute.rpc.serving import GrpcServer, build_grpc_server
from fedcompute.v1 import verifier_pb2, verifier_pb2_grpc


def platform_ca(settings: Settings) -> ec.EllipticCurvePrivateKey:
    """The local stand-in for a hardware vendor's root: it endorses launcher attestation keys."""
    return load_or_create_ec_key(settings.workdir / "secrets" / "platform-ca.pem")


def verifier_key(settings: Settings) -> ec.EllipticCurvePrivateKey:
    key = load_or_create_ec_key(settings.workdir / "secrets" / "verifier.pem")
    write_public_key(verifier_public_key_path(settings), key.public_key())
    return key


def build_verifier(settings: Settings, clock: Clock, ids: IdGenerator, audience: list[str]) -> Verifier:
    handlers: dict[str, EvidenceHandler] = {LOCAL_FORMAT: LocalEvidenceHandler(platform_ca(settings).public_key())}
    if settings.confidential_space_jwks_file:
        jwks = json.loads(settings.confidential_space_jwks_file.read_text())
        handlers[CONFIDENTIAL_SPACE_FORMAT] = ConfidentialSpaceHandler(jwks, settings.confidential_space_audience)
    policy = AppraisalPolicy(allowed_measurements(settings), allowed_hwmodels(settings))
    return Verifier(handlers, policy, verifier_key(settings), audience, clock, ids)


def build_verifier_server(settings: Settings, verifier: Verifier) -> GrpcServer:
    registrations = [
        (
            verifier_pb2_grpc.add_VerifierServiceServicer_to_server,
            VerifierServicer(verifier),
            verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name,
        )
    ]
    return build_grpc_server(
        f"{settings.host}:{settings.verifier_port}", registrations, RpcMetrics.create("verifier"), 8,
        settings.max_message_bytes,
    )  # fmt: skip
