"""Composition root of one key service (one key provider), with its own directory, store and identity."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from fedcompute.attestation.policy import (
    allowed_hwmodels,
    allowed_measurements,
    read_public_key,
    verifier_public_key_path,
)
from fedcompute.core.clock import Clock
from fedcompute.core.logs import VERSION
from fedcompute.core.settings import Settings
from fedcompute.core.telemetry import KeyMetrics
from fedcompute.keys.identity import load_or_create_identity
from fedcompute.keys.kek import load_kek
from fedcompute.keys.keystore import KeyStore
from fedcompute.keys.release_log import ReleaseLog
from fedcompute.keys.service import KeyService, ReleasePolicy
from fedcompute.keys.servicer import MAX_REQUEST_BYTES, KeyServicer
from fedcompute.rpc.metrics import announce, process_registry
from fedcompute.rpc.serving import GrpcServer, build_grpc_server
from fedcompute.v1 import key_pb2, key_pb2_grpc


def build_key_service(settings: Settings, clock: Clock) -> KeyService:
    folder = settings.key_dir()
    identity = load_or_create_identity(folder, settings.provider_id)
    kek = load_kek(settings)

    def policy() -> ReleasePolicy:
        return ReleasePolicy(
            verifier_key=read_public_key(verifier_public_key_path(settings)),
            allowed_measurements=allowed_measurements(settings),
            allowed_hwmodels=allowed_hwmodels(settings),
        )

    return KeyService(
        KeyStore(folder / "keyset.json", kek),
        identity,
        clock,
        policy,
        settings.public_key_max_age_s,
        ReleaseLog(folder / "release-log.jsonl", identity.signing_key),
    )


def build_key_server(
    settings: Settings, clock: Clock, admin_token: str, registry: CollectorRegistry | None = None
) -> GrpcServer:
    registry = registry if registry is not None else process_registry()
    announce(registry, "keys", VERSION)
    service = build_key_service(settings, clock)
    registrations = [
        (
            key_pb2_grpc.add_KeyServiceServicer_to_server,
            KeyServicer(service, admin_token, KeyMetrics.create(registry)),
            key_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
        )
    ]
    # Ready when its data directory is usable; the verifier's key may come later (releases wait for it).
    checks = {"key_directory": lambda: settings.key_dir().stat()}
    return build_grpc_server(
        settings, "keys", "key_service_port", registrations, registry, threads=8, checks=checks,
        max_receive_bytes=MAX_REQUEST_BYTES,
    )  # fmt: skip
