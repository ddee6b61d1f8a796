"""`fedcompute up` and the demo: every component on one machine.

Key services (one per provider, each its own process by default, with its own directory and identity), the
attestation verifier, the orchestration server, the key dealer, the model updater, and the launcher, which
measures and starts the aggregator worker as a separate, isolated process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcompute.attestation.app import build_verifier, build_verifier_server, platform_ca
from fedcompute.attestation.launcher import Launcher
from fedcompute.attestation.measure import measure
from fedcompute.clients.audit import AuditReport, fetch_and_audit
from fedcompute.clients.dealer import build_dealer, operator_key_clients
from fedcompute.clients.operator import create_task
from fedcompute.clients.typed import KeyClient, TaskManagementClient
from fedcompute.components import MetricsPorts, start_launcher
from fedcompute.core.clock import Clock, IdGenerator, RandomIds, SystemClock
from fedcompute.core.errors import FedcomputeError
from fedcompute.core.logs import VERSION
from fedcompute.core.loops import PollingLoop
from fedcompute.core.processes import ChildProcess, child_env, die_with_parent
from fedcompute.core.secrets import key_admin_token, operator_token, token_secret, worker_token
from fedcompute.core.settings import Settings
from fedcompute.core.telemetry import LoopMetrics, UpdaterMetrics
from fedcompute.keys.app import build_key_server
from fedcompute.keys.identity import load_identity
from fedcompute.keys.statement import load_signing_public, public_der
from fedcompute.keys.trust import load_trusted, write_trusted
from fedcompute.modelupdater.updater import ModelUpdater
from fedcompute.rpc.channels import channel_for
from fedcompute.rpc.metrics import announce, process_registry, serve_metrics
from fedcompute.rpc.serving import GrpcServer
from fedcompute.server.app import ServerApp, build_server
from fedcompute.server.operator_auth import OperatorAuthService, Role
from fedcompute.v1 import key_pb2
from fedcompute.v1 import task_management_pb2 as tm

log = structlog.get_logger("fedcompute.suite")
DEMO_DISK_WARNING = (
    "every component's data, including each key service's KEK, lies on this one disk: a demo set-up. "
    "In production give each key service its own machine and KEK secret (docs/architecture.md)."
)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class StartupFailed(Exception):
    """A component did not start serving in time; the message names it and the setting to change."""


def wait_serving(settings: Settings, address: str, timeout_s: float = 60.0, what: str = "a component") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        # A fresh channel each try: a channel refused once waits out gRPC's reconnect backoff (1 s, 1.6 s, 2.6 s...)
        # before it tries again, which made a component that was up in 0.3 s look up after ~3 s.
        with channel_for(settings, address) as channel:
            try:
                check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if check.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        if time.monotonic() > deadline:
            raise StartupFailed(
                f"{what} at {address} was not serving after {timeout_s:.0f} s (FEDCOMPUTE_STARTUP_TIMEOUT_S); "
                "its log above says why"
            )
        time.sleep(0.1)


class KeyServiceHandle:
    """One key provider that can be stopped and started again (same directory, same port)."""

    def __init__(self, settings: Settings, clock: Clock, admin_token: str, as_process: bool) -> None:
        self.settings = settings
        self._clock = clock
        self._token = admin_token
        self._as_process = as_process
        self._process: subprocess.Popen[bytes] | None = None
        self._server: GrpcServer | None = None
        self._stopped = False

    @property
    def provider_id(self) -> str:
        return self.settings.provider_id

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.key_service_port}"

    def start(self) -> KeyServiceHandle:
        self._stopped = False
        if self._as_process:
            env = child_env(self.settings, key_admin_token=self._token)
            self._process = subprocess.Popen(
                die_with_parent([sys.executable, "-m", "fedcompute.cli", "serve", "keys"]), env=env
            )  # dies with `up`: never an orphan
        else:
            self._server = build_key_server(self.settings, self._clock, self._token)
        return self

    def restart_if_dead(self) -> bool:
        """`up` supervises its key-service processes: a dead one is started again (same directory, same port);
        one stopped on purpose (``stop()``) stays stopped."""
        if self._process is None or self._process.poll() is None or self._stopped:
            return False
        log.warning("key_service_restarting", provider=self.provider_id, code=self._process.returncode)
        self.start()
        return True

    def stop(self) -> None:
        self._stopped = True
        if self._process and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=20)
        if self._server:
            self._server.stop(grace=0)
            self._server = None


@dataclass
class Suite:
    settings: Settings
    key_services: list[KeyServiceHandle]
    verifier: GrpcServer
    server: ServerApp
    launchers: list[Launcher] = field(default_factory=list)
    replicas: list[ChildProcess] = field(default_factory=list)
    loops: list[PollingLoop] = field(default_factory=list)
    metrics_http: Any = None

    @property
    def server_address(self) -> str:
        return f"{self.settings.host}:{self.server.grpc.port}"

    @property
    def key_addresses(self) -> list[str]:
        return [k.address for k in self.key_services]

    def create_task(self, spec: tm.TaskSpec) -> tm.Task:
        """As the operator: register the task's access policy with every key service, then create the task."""
        settings = self.settings
        return create_task(
            TaskManagementClient(
                channel_for(settings, self.server_address), settings.rpc_timeout_s, operator_token(settings)
            ),
            operator_key_clients(settings, key_admin_token(settings)),
            load_trusted(settings.trusted_providers_path()),
            settings.threshold,
            spec,
            settings.allowed_measurements,
        )

    def audit(self, task_id: str) -> AuditReport:
        """What `fedcompute audit` says about a task, against this suite's key services."""
        settings = self.settings
        return fetch_and_audit(
            TaskManagementClient(
                channel_for(settings, self.server_address), settings.rpc_timeout_s, operator_token(settings)
            ),
            [KeyClient(channel_for(settings, a), settings.rpc_timeout_s) for a in self.key_addresses],
            task_id,
            load_trusted(settings.trusted_providers_path()),
            settings.threshold,
        )

    def restart_dead_children(self) -> bool:
        """`up` supervises its child processes (key services, server replicas); workers have their launchers."""
        restarted = [k.restart_if_dead() for k in self.key_services] + [r.restart_if_dead() for r in self.replicas]
        return any(restarted)

    def stop(self, grace: float = 1.0) -> None:
        for launcher in self.launchers:
            launcher.stop()
        for replica in self.replicas:
            replica.stop()
        self.server.grpc.set_serving(False)  # draining: health first, then the work behind it
        for loop in self.loops:
            loop.stop()
        self.server.stop(grace)
        self.verifier.stop(grace=0)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
        for key_service in self.key_services:
            key_service.stop()


def start_key_services(
    settings: Settings, clock: Clock, token: str, ports: MetricsPorts | None = None
) -> list[KeyServiceHandle]:
    handles = []
    for i in range(settings.key_services):
        # Ports from settings: key_service_port, +1, +2 ... (0: any free port, for tests and the demo).
        port = settings.key_service_port + i if settings.key_service_port else free_port(settings.host)
        metrics = ports.take("keys") if ports and settings.key_service_processes else 0
        handles.append(
            KeyServiceHandle(
                settings.model_copy(
                    update={"provider_id": f"kp-{i}", "key_service_port": port, "metrics_port": metrics}
                ),
                clock,
                token,
                settings.key_service_processes,
            ).start()
        )
    for handle in handles:
        try:
            wait_serving(settings, handle.address, settings.startup_timeout_s, f"key service {handle.provider_id}")
        except StartupFailed:
            for started in handles:
                started.stop()
            raise
    return handles


def check_own_providers(settings: Settings, keys: list[KeyServiceHandle]) -> None:
    """Each key service this suite started answers as itself (the id and signing key in its own directory): a
    process that took its port first would otherwise be pinned as a provider. If not, they are all stopped and
    ``StartupFailed`` names the port."""
    for key in keys:
        own = load_identity(key.settings.key_dir(), key.provider_id)  # None: the service never came up as itself
        try:
            info = KeyClient(channel_for(settings, key.address), settings.rpc_timeout_s).get_provider_info(
                key_pb2.GetProviderInfoRequest())  # fmt: skip
            answer = (info.provider_id, info.signing_public_key)
        except grpc.RpcError:
            answer = ("not a key service", b"")
        if own is None or answer != (key.provider_id, public_der(own.signing_key.public_key())):
            for started in keys:
                started.stop()
            raise StartupFailed(f"key service {key.provider_id} was started for {key.address}, but another process "
                                f"answers there ({answer[0]!r}); nothing was pinned: stop that process or choose "
                                "another FEDCOMPUTE_KEY_SERVICE_PORT")  # fmt: skip


def pin_providers(settings: Settings, addresses: list[str]) -> None:
    """Trust on first use, done once by the operator at set-up: record each provider's signing key."""
    trusted = {}
    for address in addresses:
        info = KeyClient(channel_for(settings, address), settings.rpc_timeout_s).get_provider_info(
            key_pb2.GetProviderInfoRequest()
        )
        trusted[info.provider_id] = load_signing_public(info.signing_public_key)
    write_trusted(settings.trusted_providers_path(), trusted)


def start_suite(
    settings: Settings, clock: Clock | None = None, ids: IdGenerator | None = None, aggregator: bool = True
) -> Suite:
    clock = clock or SystemClock()
    ids = ids or RandomIds()
    settings.workdir.mkdir(parents=True, exist_ok=True)
    admin_token = key_admin_token(settings)
    if not settings.allowed_measurements:  # development: this installation is the reference value
        settings = settings.model_copy(update={"allowed_measurements": [measure()]})
    ports, registry = MetricsPorts(settings), process_registry()
    main_metrics = ports.take("server")
    provider_ids = [f"kp-{i}" for i in range(settings.key_services)]
    platform_ca(settings)  # the launcher's CA: its public key is all the verifier reads
    verifier = build_verifier(settings, clock, ids, provider_ids)
    # Internal-only servers (key services, verifier) require client certificates when TLS is on (mTLS).
    internal = settings.model_copy(update={"tls_client_auth": settings.tls_cert_file is not None})
    keys = start_key_services(internal, clock, admin_token, ports)
    settings = settings.model_copy(update={"key_service_addresses": [k.address for k in keys]})
    check_own_providers(settings, keys)
    pin_providers(settings, settings.key_service_addresses)
    verifier_server = build_verifier_server(internal.model_copy(update={"metrics_port": 0}), verifier, registry)
    settings = settings.model_copy(update={"verifier_address": f"{settings.host}:{verifier_server.port}"})
    if settings.server_replicas > 1:  # every replica binds the same port with SO_REUSEPORT
        port = settings.server_port or free_port(settings.host)
        settings = settings.model_copy(update={"server_port": port, "reuse_port": True})
    server = build_server(settings, clock, ids, worker_token(settings), token_secret(settings), registry)
    try:  # the operator's own token works at once (CLI, dealer, Suite.create_task); never stored in the clear
        OperatorAuthService(server.db, clock, ids).ensure(operator_token(settings), "up", Role.ADMIN)
    except FedcomputeError as exc:
        server.stop()
        raise StartupFailed(exc.public_message) from None
    settings = settings.model_copy(update={"server_address": f"{settings.host}:{server.grpc.port}"})
    suite = Suite(settings, keys, verifier_server, server)
    secrets = {"internal_token": worker_token(settings), "token_secret": token_secret(settings)}
    suite.replicas = [
        ChildProcess(
            ["serve", "server"],
            child_env(settings.model_copy(update={"metrics_port": ports.take("server")}), **secrets),
            f"server replica {i}",
        ).start()
        for i in range(1, settings.server_replicas)
    ]
    for component in ("dealer", "modelupdater"):
        announce(registry, component, VERSION)
    updater = ModelUpdater(
        server.db, server.blobs, clock, ids, settings.max_round_attempts, settings.upload_retention_s,
        metrics=UpdaterMetrics.create(registry), purge_every_s=settings.housekeeping_interval_s,
    )  # fmt: skip
    dealer = build_dealer(settings, clock, admin_token)
    updating = PollingLoop("modelupdater", LoopMetrics.create("modelupdater", registry).counted(updater.run_once),
                           settings.poll_interval_s).start()  # fmt: skip
    dealing = PollingLoop("dealer", LoopMetrics.create("dealer", registry).counted(dealer.run_once),
                          settings.poll_interval_s).start()  # fmt: skip
    suite.loops = [updating, dealing, PollingLoop("supervisor", suite.restart_dead_children, 1.0).start()]
    server.job_succeeded.add(updating.poke)  # in this process: applied at once, not at the next poll
    server.task_changed.add(dealing.poke)  # a new task's population is keyed at once
    if aggregator:
        suite.launchers = [
            start_launcher(_worker_settings(settings, ports), clock, worker_token(settings), i)
            for i in range(settings.aggregator_workers)
        ]
    if main_metrics:
        suite.metrics_http = serve_metrics(registry, settings.host, main_metrics)
    ports.write(settings.public_dir() / "prometheus-targets.json")
    return suite


def _worker_settings(settings: Settings, ports: MetricsPorts) -> Settings:
    """Each worker its own metrics port and, where health ports are on, a free one of its own; where the server
    keeps its blobs on this disk (no S3 store) and nothing else was set, the worker reads contributions there."""
    health = free_port(settings.host) if settings.health_port else 0
    update: dict[str, object] = {"metrics_port": ports.take("aggregator"), "health_port": health}
    if settings.aggregator_blob_dir is None and not settings.blob_store_url:
        update["aggregator_blob_dir"] = settings.blob_dir()
    return settings.model_copy(update=update)
