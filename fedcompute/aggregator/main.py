"""Entry point of the measured worker process (started by the launcher with ``python -I -B``)."""

from __future__ import annotations

import signal
import threading

from fedcompute.aggregator.keys import KeyAccess
from fedcompute.aggregator.worker import AggregatorWorker
from fedcompute.attestation.launcher import request_evidence
from fedcompute.clients.typed import AggregationClient, KeyClient, VerifierClient
from fedcompute.core.clock import RandomIds
from fedcompute.core.logs import configure_logging
from fedcompute.core.loops import PollingLoop
from fedcompute.core.secrets import load_or_create
from fedcompute.core.settings import Settings
from fedcompute.keys.trust import load_trusted
from fedcompute.rpc.channels import open_channel


def build_worker(settings: Settings, worker_id: str) -> AggregatorWorker:
    token = settings.internal_token or load_or_create(settings.workdir / "secrets" / "internal-token")
    socket_path = settings.attester_socket
    if socket_path is None:
        raise SystemExit("FEDCOMPUTE_ATTESTER_SOCKET is not set: the worker must be started by the launcher")
    jobs = AggregationClient(
        open_channel(settings.server_address, settings.max_message_bytes), settings.rpc_timeout_s, token
    )
    access = KeyAccess(
        providers=[KeyClient(open_channel(a), settings.rpc_timeout_s) for a in settings.key_service_addresses],
        trusted=load_trusted(settings.trusted_providers_path()),
        threshold=settings.threshold,
        verifier=VerifierClient(open_channel(settings.verifier_address), settings.rpc_timeout_s),
        evidence=lambda nonces: request_evidence(socket_path, nonces),
    )
    return AggregatorWorker(jobs, access, worker_id)


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_json, settings.log_level)
    worker = build_worker(settings, RandomIds().new_id("worker"))
    loop = PollingLoop("aggregator", worker.run_once, settings.poll_interval_s).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    loop.stop()


if __name__ == "__main__":
    main()
