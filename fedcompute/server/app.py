"""Composition root of the orchestration server: settings -> database -> services -> servicers -> gRPC server."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram

from fedcompute.clients.typed import KeyClient
from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.logs import VERSION
from fedcompute.core.loops import Listeners, PollingLoop
from fedcompute.core.settings import Settings
from fedcompute.core.telemetry import JobsCollector, ServerMetrics
from fedcompute.core.transitions import JobStatus
from fedcompute.rpc.auth import TokenSigner
from fedcompute.rpc.channels import channel_for
from fedcompute.rpc.idle import IdleStreams
from fedcompute.rpc.metrics import announce, process_registry
from fedcompute.rpc.serving import GrpcServer, add_service, build_grpc_server
from fedcompute.server.api_devices import DECODED_HERE as UPLOADS_DECODED_HERE
from fedcompute.server.api_devices import ENCODED_HERE as DOWNLOADS_ENCODED_HERE
from fedcompute.server.api_devices import ResourceServicer, TaskAssignmentServicer, UploadServicer
from fedcompute.server.api_operators import TaskManagementServicer
from fedcompute.server.api_workers import ENCODED_HERE, AggregationServicer
from fedcompute.server.assignment import AssignmentService
from fedcompute.server.deadlines import DeadlineSweeper
from fedcompute.server.device_attestation import load_attestor
from fedcompute.server.jobs import JobService, RetryLimits
from fedcompute.server.keyring import KeyRing
from fedcompute.server.operator_auth import OperatorAuthService
from fedcompute.server.pace import PaceSteering
from fedcompute.server.resources import ResourceService
from fedcompute.server.staging import StagingSweeper
from fedcompute.server.tasks import TaskService
from fedcompute.server.uploads import UploadService
from fedcompute.store.blobstores import StagedBlobStore, open_blob_store
from fedcompute.store.database import Database
from fedcompute.v1 import (
    aggregation_pb2,
    resource_pb2,
    task_assignment_pb2,
    task_assignment_pb2_grpc,
    task_management_pb2,
    task_management_pb2_grpc,
    upload_pb2,
)


@dataclass
class ServerApp:
    grpc: GrpcServer
    db: Database
    blobs: StagedBlobStore
    registry: CollectorRegistry
    sweeper: PollingLoop
    staging: PollingLoop
    jobs: JobService
    task_changed: Listeners  # a task was created or closed here (the suite's dealer is poked)
    job_succeeded: Listeners  # a job's result came in here (the suite's model updater is poked)

    def stop(self, grace: float = 1.0) -> None:
        """Drain: health NOT_SERVING, in-flight RPCs get ``grace`` seconds, then the loops and the database."""
        self.jobs.close()  # workers' waiting claims answer at once
        self.grpc.stop(grace)
        self.sweeper.stop()
        self.staging.stop()
        self.db.dispose()


def open_storage(settings: Settings) -> tuple[Database, StagedBlobStore]:
    """The database (migrated) and the blob store FEDCOMPUTE_BLOB_STORE_URL names (a bad bucket fails first)."""
    blobs = open_blob_store(settings)
    db = Database(settings.resolved_database_url())
    db.migrate()
    return db, blobs


def build_server(
    settings: Settings,
    clock: Clock,
    ids: IdGenerator,
    internal_token: str,
    token_secret: str,
    registry: CollectorRegistry | None = None,
) -> ServerApp:
    registry = registry if registry is not None else process_registry()
    attestor = load_attestor(settings.device_attestation)
    db, blobs = open_storage(settings)
    signer = TokenSigner(token_secret.encode())
    key_clients = [KeyClient(channel_for(settings, a), settings.rpc_timeout_s) for a in settings.key_service_addresses]
    announce(registry, "server", VERSION)
    metrics = ServerMetrics.create(registry)
    windows = Histogram(
        "fedcompute_server_retry_window_seconds",
        "Longest retry delay suggested to a turned-away device, by rejection reason.",
        ["reason"],
        buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 7200),
        registry=registry,
    )
    pace = PaceSteering(
        (settings.retry_delay_min_s, settings.retry_delay_max_s),
        (settings.retry_delay_min_s * 10, settings.retry_delay_max_s * 10),
        random.Random(),
        time.monotonic,
        windows,
    )
    assignments = AssignmentService(db, clock, ids, signer, KeyRing(key_clients, clock))
    task_changed, job_succeeded, round_closed = Listeners(assignments.forget_open_tasks), Listeners(), Listeners()
    tasks = TaskService(db, blobs, clock, ids, settings.max_plan_bytes, on_change=task_changed)
    uploads = UploadService(db, blobs, clock, ids, signer, settings.max_upload_bytes, on_round_closed=round_closed)
    resources = ResourceService(db, blobs, settings.chunk_size_bytes)
    idle = IdleStreams(
        settings.stream_idle_s,
        settings.resolved_device_streams_max(),
        lambda method: metrics.idle_streams.labels(method).inc(),
    )
    limits = RetryLimits(settings.max_job_attempts, settings.max_round_attempts, 0.25, settings.job_backoff_max_s)
    jobs = JobService(db, blobs, clock, ids, settings.lease_s, limits, metrics, settings.poll_interval_s, job_succeeded)
    round_closed.add(jobs.wake_claims)
    registry.register(JobsCollector(jobs.count_by_status, [str(s) for s in JobStatus]))
    aggregation = aggregation_pb2.DESCRIPTOR.services_by_name["AggregationService"]
    resource = resource_pb2.DESCRIPTOR.services_by_name["ResourceService"]
    upload = upload_pb2.DESCRIPTOR.services_by_name["UploadService"]
    registrations: list[tuple[Callable[[Any, grpc.Server], None], Any, str]] = [
        (
            task_management_pb2_grpc.add_TaskManagementServiceServicer_to_server,
            TaskManagementServicer(tasks, OperatorAuthService(db, clock, ids)),
            task_management_pb2.DESCRIPTOR.services_by_name["TaskManagementService"].full_name,
        ),
        (
            task_assignment_pb2_grpc.add_TaskAssignmentServiceServicer_to_server,
            TaskAssignmentServicer(
                assignments, pace, settings.max_upload_bytes, settings.chunk_size_bytes, metrics, attestor
            ),
            task_assignment_pb2.DESCRIPTOR.services_by_name["TaskAssignmentService"].full_name,
        ),
        (
            add_service(upload, decoded=UPLOADS_DECODED_HERE),  # its chunks read as views of the messages
            UploadServicer(uploads, idle, metrics),
            upload.full_name,
        ),
        (
            add_service(resource, encoded=DOWNLOADS_ENCODED_HERE),  # its chunks sent as encoded here
            ResourceServicer(resources, idle),
            resource.full_name,
        ),
        (
            add_service(aggregation, encoded=ENCODED_HERE),  # its contributions streamed as encoded here
            AggregationServicer(jobs, internal_token, metrics),
            aggregation.full_name,
        ),
    ]
    device_services = [name for _, _, name in registrations[1:4]]  # assignment, upload, resource
    server = build_grpc_server(
        settings,
        "server",
        "server_port",
        registrations,
        registry,
        checks={"database": db.ping},
        limited=device_services,
    )
    sweeper = DeadlineSweeper(db, clock, ids, settings.max_round_attempts, metrics)
    loop = PollingLoop("deadlines", sweeper.run_once, settings.housekeeping_interval_s).start()
    staged = StagingSweeper(db, blobs.staging_dir(), clock, timedelta(seconds=settings.staging_sweep_s))
    staging = PollingLoop("staging", staged.run_once, settings.housekeeping_interval_s).start()
    return ServerApp(server, db, blobs, registry, loop, staging, jobs, task_changed, job_succeeded)
