"""Composition root of one key service (one key provider), with its own store and port."""

from __future__ import annotations

from fedcompute.core.clock import Clock
from fedcompute.core.settings import Settings
from fedcompute.keys.keystore import KeyStore
from fedcompute.keys.service import KeyService
from fedcompute.keys.servicer import KeyServicer
from fedcompute.rpc.metrics import RpcMetrics
from fedcompute.rpc.serving import GrpcServer, build_grpc_server
from fedcompute.v1 import key_pb2, key_pb2_grpc


def build_key_server(settings: Settings, clock: Clock, internal_token: str) -> GrpcServer:
    store = KeyStore(settings.workdir / "keys" / settings.provider_id / "keyset.json")
    service = KeyService(store, clock, settings.provider_id, settings.key_lifetime_s, settings.public_key_max_age_s)
    registrations = [
        (
            key_pb2_grpc.add_KeyServiceServicer_to_server,
            KeyServicer(service, internal_token),
            key_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
        )
    ]
    metrics = RpcMetrics.create("keys")
    return build_grpc_server(
        f"{settings.host}:{settings.key_service_port}", registrations, metrics, 8, settings.max_message_bytes
    )
