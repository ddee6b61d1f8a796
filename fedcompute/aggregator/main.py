"""Entry point of the measured worker process (started by the launcher with ``python -I -B``)."""

from __future__ import annotations

import signal
import threading

import torch
from prometheus_client import CollectorRegistry

from fedcompute.aggregator.fedavg import accumulation_device
from fedcompute.aggregator.keys import KeyAccess
from fedcompute.aggregator.worker import AggregatorWorker
from fedcompute.attestation.launcher import request_evidence
from fedcompute.clients.typed import AggregationClient, KeyClient, VerifierClient
from fedcompute.components import announce_start, at_least, serving
from fedcompute.core.clock import RandomIds
from fedcompute.core.logs import VERSION, configure_logging
from fedcompute.core.loops import PollingLoop
from fedcompute.core.memory import hold_frozen, keep_large_buffers
from fedcompute.core.secrets import load_or_create
from fedcompute.core.settings import SettingError, Settings
from fedcompute.core.telemetry import LoopMetrics, WorkerMetrics
from fedcompute.keys.trust import load_trusted
from fedcompute.rpc.channels import channel_for
from fedcompute.rpc.metrics import announce, process_registry
from fedcompute.rpc.serving import build_health_server


def build_worker(settings: Settings, worker_id: str, registry: CollectorRegistry | None = None) -> AggregatorWorker:
    try:
        device = accumulation_device(settings.aggregator_device)  # before anything is asked of anyone
    except ValueError as exc:
        raise SystemExit(f"aggregator worker not started: {exc}") from None
    token = settings.internal_token or load_or_create(settings.workdir / "secrets" / "internal-token")
    socket_path = settings.attester_socket
    if socket_path is None:
        raise SystemExit("FEDCOMPUTE_ATTESTER_SOCKET is not set: the worker must be started by the launcher")
    jobs = AggregationClient(channel_for(settings, settings.server_address), settings.rpc_timeout_s, token)
    access = KeyAccess(
        providers=[KeyClient(channel_for(settings, a), settings.rpc_timeout_s) for a in settings.key_service_addresses],
        trusted=load_trusted(settings.trusted_providers_path()),
        threshold=settings.threshold,
        verifier=VerifierClient(channel_for(settings, settings.verifier_address), settings.rpc_timeout_s),
        evidence=lambda nonces: request_evidence(socket_path, nonces),
    )
    wait = min(settings.poll_interval_s, settings.rpc_timeout_s / 2)  # claims long-poll: no job waits for a poll
    return AggregatorWorker(
        jobs, access, worker_id, metrics=WorkerMetrics.create(registry), device=device, claim_wait_s=wait,
        blob_dir=settings.aggregator_blob_dir, max_envelope_bytes=settings.max_upload_bytes,
    )  # fmt: skip


def main() -> None:
    keep_large_buffers()  # envelopes and tensors of MiBs, all day (core/memory.py)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        settings = Settings.load()
    except SettingError as exc:
        raise SystemExit(f"aggregator worker not started: invalid setting: {exc}") from None
    configure_logging(settings.log_json, settings.log_level, "aggregator")
    # the worker's own pipeline keeps three threads busy (hash, open, add: worker.py); torch's intra-op pool (a
    # thread per core) would only compete with them on the adds, which are memory-bound (bench: +8% with one)
    torch.set_num_threads(1)
    registry = process_registry()
    announce(registry, "aggregator", VERSION)
    worker = build_worker(settings, RandomIds().new_id("worker"), registry)
    keys = [serving(channel_for(settings, a)) for a in settings.key_service_addresses]
    checks = {
        "server": serving(channel_for(settings, settings.server_address)),
        "verifier": serving(channel_for(settings, settings.verifier_address)),
        "key_services": at_least(settings.threshold, keys),
    }
    health = build_health_server(settings, "aggregator", checks, registry)
    loop = PollingLoop("aggregator", LoopMetrics.create("aggregator", registry).counted(worker.run_once),
                       settings.poll_interval_s).start()  # fmt: skip
    announce_start("aggregator", settings, f"{settings.host}:{health.port}" if health else "", registry)
    hold_frozen(stop)  # until stopped; no full collection walks start-up's objects (torch's among them) again
    if health:
        health.stop(settings.shutdown_grace_s)
    loop.stop()  # a job in progress finishes first (its lease would otherwise run out)


if __name__ == "__main__":
    main()
