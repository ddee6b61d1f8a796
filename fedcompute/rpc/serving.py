"""Server factory: one interceptor for errors, logs, request ids, rate limits and metrics (``rpc/interceptor.py``);
health that follows each component's dependencies, reflection v1 and v1alpha, TLS from settings, and draining on
stop."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from fedcompute.core.loops import PollingLoop
from fedcompute.core.settings import SettingError, Settings
from fedcompute.rpc.interceptor import ObservingInterceptor
from fedcompute.rpc.limits import AddressRateLimiter
from fedcompute.rpc.metrics import RpcMetrics
from fedcompute.rpc.reflection import enable_reflection
from fedcompute.rpc.tls import server_tls

log = structlog.get_logger("fedcompute.rpc")


def add_service(
    service: ServiceDescriptor, encoded: frozenset[str] = frozenset(), decoded: frozenset[str] = frozenset()
) -> Callable[[Any, grpc.Server], None]:
    """A registration like the generated ``add_XServicer_to_server`` for ``service`` (its methods, message types
    and streaming from the descriptor), except that the methods named in ``encoded`` return or yield responses
    their servicer has already encoded (bytes, sent as they are), and those named in ``decoded`` get their
    requests as received (bytes: their servicer decodes them)."""

    def add(servicer: Any, server: grpc.Server) -> None:
        handlers = {}
        for method in service.methods:
            request = message_factory.GetMessageClass(method.input_type)
            response = message_factory.GetMessageClass(method.output_type)
            serialize = _as_is if method.name in encoded else response.SerializeToString
            deserialize = _as_is if method.name in decoded else request.FromString
            make = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = make(getattr(servicer, method.name), deserialize, serialize)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]

    return add


def _as_is(encoded: bytes) -> bytes:
    return encoded


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


@dataclass
class GrpcServer:
    """A started gRPC server, the port it bound, its health servicer and the dependency checks behind it.

    Health is SERVING while every check passes (each check raises when its dependency is unusable: a database,
    the servers a component calls); ``stop`` drains: NOT_SERVING first, then in-flight RPCs get the grace."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    services: list[str] = field(default_factory=list)
    component: str = ""
    checks: dict[str, Callable[[], object]] = field(default_factory=dict)
    draining: bool = False
    _serving: bool | None = None
    _monitor: PollingLoop | None = None

    def set_serving(self, serving: bool) -> None:
        serving = serving and not self.draining
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.services]:
            self.health.set(name, status)
        self._serving = serving

    def check_health(self) -> bool:
        """Run every dependency check once and set the health status from the result (a change is logged)."""
        failed = {}
        for name, check in self.checks.items():
            try:
                check()
            except Exception as exc:  # any failure of a dependency makes this component not ready
                failed[name] = type(exc).__name__
        serving = not failed
        if serving != self._serving and not self.draining:
            (log.info if serving else log.warning)(
                "health_changed", component=self.component, serving=serving, failing=sorted(failed)
            )
        self.set_serving(serving)
        return False  # a polling step with no more work

    def monitor(self, interval_s: float) -> GrpcServer:
        """Re-run the checks every ``interval_s`` in the background."""
        if self.checks:
            self._monitor = PollingLoop(f"health-{self.component}", self.check_health, interval_s).start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.draining = True
        self.set_serving(False)
        if self._monitor:
            self._monitor.stop()
        self.server.stop(grace).wait()


def build_grpc_server(
    settings: Settings,
    component: str,
    port_setting: str,
    registrations: Sequence[tuple[Callable[[Any, grpc.Server], None], Any, str]],
    registry: CollectorRegistry | None = None,
    threads: int | None = None,
    checks: Mapping[str, Callable[[], object]] | None = None,
    limited: Sequence[str] = (),
    max_receive_bytes: int | None = None,
) -> GrpcServer:
    """Create, register and start a server on ``settings.host`` and the port named by ``port_setting``:
    (add_XServicer_to_server, servicer, full service name) triples; health (v1) and reflection (v1, v1alpha);
    TLS or mTLS from settings; RPC metrics under ``fedcompute_<component>_``; the services named in
    ``limited`` are rate limited per client address; ``max_receive_bytes``: a smaller receive limit than
    ``max_message_bytes`` (services whose every request is small: parsing one costs memory before any check)."""
    port_wanted = int(getattr(settings, port_setting))
    tls = server_tls(settings)
    if port_wanted and not _bindable(settings.host, port_wanted, settings.reuse_port):
        raise SettingError(port_setting, f"cannot bind {settings.host}:{port_wanted}: the port is in use")
    limited_at_all = bool(limited) and settings.device_rate_per_s > 0  # 0: no limit, so no limiter to consult
    limiter = AddressRateLimiter(settings.device_rate_per_s, settings.device_rate_burst) if limited_at_all else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads or settings.worker_threads, thread_name_prefix="grpc"),
        interceptors=[ObservingInterceptor(RpcMetrics.create(component, registry), limiter, frozenset(limited))],
        options=[
            ("grpc.max_receive_message_length", min(settings.max_message_bytes, max_receive_bytes or 2**31 - 1)),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ],
    )
    names = []
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection([*names, health.SERVICE_NAME], server)
    address = f"{settings.host}:{port_wanted}"
    try:
        port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise SettingError(port_setting, f"cannot bind {address}: the port is in use or the address is not local")
    server.start()
    started = GrpcServer(server, port, health_servicer, names, component, dict(checks or {}))
    started.set_serving(True)
    if started.checks:
        started.check_health()
        started.monitor(settings.housekeeping_interval_s)
    return started


def _bindable(host: str, port: int, reuse_port: bool) -> bool:
    """Whether ``host:port`` can be bound (checked first, so a busy port is one line, not gRPC's log)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def build_health_server(
    settings: Settings, component: str, checks: Mapping[str, Callable[[], object]], registry: CollectorRegistry | None
) -> GrpcServer | None:
    """For components that serve no other RPCs (dealer, model updater, aggregator worker): health and
    reflection alone on ``FEDCOMPUTE_HEALTH_PORT`` (0: none)."""
    if settings.health_port == 0:
        return None
    return build_grpc_server(settings, component, "health_port", [], registry, threads=2, checks=checks)
