"""`fedcompute up`: the whole suite in one process — key service, server, aggregator worker, model updater."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedcompute.aggregator.worker import AggregatorWorker
from fedcompute.clients.typed import AggregationClient, KeyClient
from fedcompute.core.clock import Clock, IdGenerator, RandomIds, SystemClock
from fedcompute.core.loops import PollingLoop
from fedcompute.core.secrets import load_or_create
from fedcompute.core.settings import Settings
from fedcompute.keys.app import build_key_server
from fedcompute.modelupdater.updater import ModelUpdater
from fedcompute.rpc.channels import open_channel
from fedcompute.rpc.serving import GrpcServer
from fedcompute.server.app import ServerApp, build_server


@dataclass(frozen=True)
class Secrets:
    internal_token: str
    token_secret: str


def load_secrets(settings: Settings) -> Secrets:
    folder = settings.workdir / "secrets"
    return Secrets(
        settings.internal_token or load_or_create(folder / "internal-token"),
        settings.token_secret or load_or_create(folder / "token-secret"),
    )


@dataclass
class Suite:
    settings: Settings
    key_server: GrpcServer
    server: ServerApp
    loops: list[PollingLoop] = field(default_factory=list)

    @property
    def server_address(self) -> str:
        return f"{self.settings.host}:{self.server.grpc.port}"

    @property
    def key_address(self) -> str:
        return f"{self.settings.host}:{self.key_server.port}"

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        self.server.stop()
        self.key_server.stop()


def start_suite(settings: Settings, clock: Clock | None = None, ids: IdGenerator | None = None) -> Suite:
    clock = clock or SystemClock()
    ids = ids or RandomIds()
    settings.workdir.mkdir(parents=True, exist_ok=True)
    secrets = load_secrets(settings)
    key_server = build_key_server(settings, clock, secrets.internal_token)
    settings = settings.model_copy(update={"key_service_addresses": [f"{settings.host}:{key_server.port}"]})
    server = build_server(settings, clock, ids, secrets.internal_token, secrets.token_secret)
    settings = settings.model_copy(update={"server_address": f"{settings.host}:{server.grpc.port}"})
    suite = Suite(settings, key_server, server)
    updater = ModelUpdater(server.db, server.blobs, clock, ids, settings.max_job_attempts)
    worker = build_worker(settings, secrets.internal_token, ids.new_id("worker"))
    suite.loops = [
        PollingLoop("modelupdater", updater.run_once, settings.poll_interval_s).start(),
        PollingLoop("aggregator", worker.run_once, settings.poll_interval_s).start(),
    ]
    return suite


def build_worker(settings: Settings, internal_token: str, worker_id: str) -> AggregatorWorker:
    jobs = AggregationClient(
        open_channel(settings.server_address, settings.max_message_bytes), settings.rpc_timeout_s, internal_token
    )
    keys = [KeyClient(open_channel(a), settings.rpc_timeout_s, internal_token) for a in settings.key_service_addresses]
    return AggregatorWorker(jobs, keys, worker_id)
