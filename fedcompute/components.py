"""`fedcompute serve COMPONENT`: one component per process, as a cluster runs it.

Each component gets the same runtime: settings checked at start (one line naming the variable, exit 2), JSON
logs stamped with the component, a start-up line with its address, version and secret-free configuration, its
own Prometheus registry served on ``FEDCOMPUTE_METRICS_PORT``, gRPC health that follows its dependencies
(components without RPCs of their own serve it on ``FEDCOMPUTE_HEALTH_PORT``), and on SIGTERM a drain: health
NOT_SERVING, in-flight RPCs get ``FEDCOMPUTE_SHUTDOWN_GRACE_S``, then exit. Imports are per component, so key
services, verifier and dealer start without torch (a key service holding a DP policy then loads Opacus'
accountants, and torch with them, in the background: ``core/privacy.py load_accountants_soon``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from fedcompute.attestation.app import platform_ca
from fedcompute.attestation.launcher import Launcher
from fedcompute.attestation.measure import measure
from fedcompute.core.clock import Clock, RandomIds, SystemClock
from fedcompute.core.logs import VERSION
from fedcompute.core.loops import PollingLoop
from fedcompute.core.processes import child_env
from fedcompute.core.settings import Settings
from fedcompute.core.telemetry import LoopMetrics
from fedcompute.rpc.metrics import announce, process_registry, serve_metrics
from fedcompute.rpc.serving import GrpcServer, build_health_server

COMPONENTS = ("server", "keys", "verifier", "dealer", "aggregator", "modelupdater")
log = structlog.get_logger("fedcompute.components")


def serving(channel: grpc.Channel, timeout_s: float = 2.0) -> Callable[[], None]:
    """A dependency check: the gRPC health of whatever ``channel`` reaches must be SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)

    def check() -> None:
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError("not serving")

    return check


def at_least(needed: int, checks: list[Callable[[], None]]) -> Callable[[], None]:
    """A check that passes while ``needed`` of ``checks`` pass (t of n key services)."""

    def check() -> None:
        passing = 0
        for one in checks:
            try:
                one()
                passing += 1
            except Exception:  # an unreachable key service is what this counts
                continue
        if passing < needed:
            raise RuntimeError(f"{passing} of {len(checks)} reachable, {needed} needed")

    return check


@dataclass
class Running:
    """A started component: what to stop, in order, on SIGTERM."""

    component: str
    address: str
    servers: list[GrpcServer] = field(default_factory=list)
    loops: list[PollingLoop] = field(default_factory=list)
    stops: list[Callable[[float], None]] = field(default_factory=list)  # given the grace: server app, launcher

    def stop(self, grace: float) -> None:
        for server in self.servers:
            server.stop(grace)
        for stop in self.stops:
            stop(grace)
        for loop in self.loops:
            loop.stop()


def start_component(component: str, settings: Settings, registry: CollectorRegistry | None = None) -> Running:
    """Build and start ``component`` from ``settings`` (raises ``SettingError`` for a setting that cannot work)."""
    registry = registry if registry is not None else process_registry()
    clock, ids = SystemClock(), RandomIds()
    from fedcompute.core.secrets import key_admin_token, token_secret, worker_token

    if component == "server":
        from fedcompute.server.app import build_server

        app = build_server(settings, clock, ids, worker_token(settings), token_secret(settings), registry)
        return Running(component, f"{settings.host}:{app.grpc.port}", stops=[app.stop])
    if component == "keys":
        from fedcompute.keys.app import build_key_server

        server = build_key_server(settings, clock, key_admin_token(settings), registry)
        return Running(component, f"{settings.host}:{server.port}", servers=[server])
    if component == "verifier":
        from fedcompute.attestation.app import build_verifier, build_verifier_server
        from fedcompute.keys.trust import load_trusted

        audience = sorted(load_trusted(settings.trusted_providers_path()))
        server = build_verifier_server(settings, build_verifier(settings, clock, ids, audience), registry)
        return Running(component, f"{settings.host}:{server.port}", servers=[server])
    if component == "dealer":
        from fedcompute.clients.dealer import build_dealer
        from fedcompute.rpc.channels import channel_for

        dealer = build_dealer(settings, clock, key_admin_token(settings))
        announce(registry, "dealer", VERSION)
        step = LoopMetrics.create("dealer", registry).counted(dealer.run_once)
        keys = [serving(channel_for(settings, a)) for a in settings.key_service_addresses]
        checks = {
            "server": serving(channel_for(settings, settings.server_address)),
            "key_services": at_least(settings.threshold, keys),
        }
        return _loop_component(component, settings, registry, step, checks)
    if component == "modelupdater":
        from fedcompute.core.telemetry import UpdaterMetrics
        from fedcompute.modelupdater.updater import ModelUpdater
        from fedcompute.server.app import open_storage

        db, blobs = open_storage(settings)
        announce(registry, "modelupdater", VERSION)
        updater = ModelUpdater(
            db, blobs, clock, ids, settings.max_round_attempts, settings.upload_retention_s,
            metrics=UpdaterMetrics.create(registry), purge_every_s=settings.housekeeping_interval_s,
        )  # fmt: skip
        step = LoopMetrics.create("modelupdater", registry).counted(updater.run_once)
        return _loop_component(component, settings, registry, step, {"database": db.ping})
    if component == "aggregator":
        platform_ca(settings)  # the worker (its child) serves its own metrics and health
        launcher = start_launcher(settings, clock, worker_token(settings))
        return Running(component, str(settings.workdir / "attest"), stops=[lambda _grace: launcher.stop()])
    raise ValueError(f"unknown component {component!r}: one of {', '.join(COMPONENTS)}")


def _loop_component(
    component: str,
    settings: Settings,
    registry: CollectorRegistry,
    step: Callable[[], bool | int],
    checks: Mapping[str, Callable[[], object]],
) -> Running:
    health = build_health_server(settings, component, checks, registry)
    loop = PollingLoop(component, step, settings.poll_interval_s).start()
    address = f"{settings.host}:{health.port}" if health else "(no health port)"
    return Running(component, address, servers=[health] if health else [], loops=[loop])


class MetricsPorts:
    """`up`'s Prometheus endpoints: the main process (server, verifier, dealer, model updater) on
    FEDCOMPUTE_METRICS_PORT, each child process (key service, server replica, worker) on the next ports; listed
    for Prometheus in ``public/prometheus-targets.json`` (file_sd format). Metrics port 0: none at all."""

    def __init__(self, settings: Settings) -> None:
        self._host = settings.host
        self._next = settings.metrics_port
        self.targets: list[tuple[str, int]] = []

    def take(self, component: str) -> int:
        if not self._next:
            return 0
        port, self._next = self._next, self._next + 1
        self.targets.append((component, port))
        return port

    def write(self, path: Path) -> None:
        if not self.targets:
            return
        entries = [{"targets": [f"{self._host}:{p}"], "labels": {"component": c}} for c, p in self.targets]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries, indent=2))


def dev_tls(settings: Settings) -> Settings:
    """`up --tls`: certificates from a local dev CA in WORKDIR/tls (made once), one for the whole suite."""
    from fedcompute.rpc.certs import make_dev_certs

    folder = settings.workdir / "tls"
    certs = make_dev_certs(folder) if not (folder / "ca.pem").exists() else None
    ca = folder / "ca.pem"
    return settings.model_copy(
        update={
            "tls_ca_file": ca,
            "tls_cert_file": certs.cert("server") if certs else folder / "server.pem",
            "tls_key_file": certs.key("server") if certs else folder / "server-key.pem",
            "plaintext": False,
        }
    )


def announce_start(
    component: str, settings: Settings, address: str, registry: CollectorRegistry, metrics: bool = True
) -> None:
    """Serve metrics (if a port is set and ``metrics``) and log the start-up line: address, version, effective
    configuration."""
    if settings.metrics_port and metrics:
        serve_metrics(registry, settings.host, settings.metrics_port)
    log.info(
        "component_started",
        address=address,
        metrics=f"{settings.host}:{settings.metrics_port}" if settings.metrics_port else "",
        config=settings.public(),
    )


def start_launcher(settings: Settings, clock: Clock, token: str, index: int = 0) -> Launcher:
    """A launcher and its measured worker; the worker serves its metrics and health on the ports in
    ``settings`` (`up` gives each worker its own)."""
    name = "launcher.sock" if index == 0 else f"launcher-{index}.sock"
    launcher = Launcher(
        settings.workdir / "attest" / name,
        platform_ca(settings),
        measure(),  # the launcher measures the code it is about to start, whatever the policy says
        clock,
        debug=settings.aggregator_debug,
    ).serve()
    launcher.start_worker(child_env(settings, internal_token=token))
    return launcher
