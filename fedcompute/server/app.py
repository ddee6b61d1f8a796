"""Composition root of the orchestration server: settings -> database -> services -> servicers -> gRPC server."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from prometheus_client import Histogram

from fedcompute.clients.typed import KeyClient
from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.loops import PollingLoop
from fedcompute.core.settings import Settings
from fedcompute.rpc.auth import TokenSigner
from fedcompute.rpc.channels import open_channel
from fedcompute.rpc.metrics import RpcMetrics
from fedcompute.rpc.serving import GrpcServer, build_grpc_server
from fedcompute.server.api_devices import ResourceServicer, TaskAssignmentServicer, UploadServicer
from fedcompute.server.api_operators import TaskManagementServicer
from fedcompute.server.api_workers import AggregationServicer
from fedcompute.server.assignment import AssignmentService
from fedcompute.server.deadlines import DeadlineSweeper
from fedcompute.server.jobs import JobService, RetryLimits
from fedcompute.server.keyring import KeyRing
from fedcompute.server.operator_auth import OperatorAuthService
from fedcompute.server.pace import PaceSteering
from fedcompute.server.resources import ResourceService
from fedcompute.server.tasks import TaskService
from fedcompute.server.uploads import UploadService
from fedcompute.store.blobs import LocalBlobStore
from fedcompute.store.blobstores import StagedBlobStore, open_blob_store
from fedcompute.store.database import Database
from fedcompute.v1 import (
    aggregation_pb2,
    aggregation_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
    task_assignment_pb2,
    task_assignment_pb2_grpc,
    task_management_pb2,
    task_management_pb2_grpc,
    upload_pb2,
    upload_pb2_grpc,
)


@dataclass
class ServerApp:
    grpc: GrpcServer
    db: Database
    blobs: StagedBlobStore
    metrics: RpcMetrics
    sweeper: PollingLoop

    def stop(self) -> None:
        self.sweeper.stop()
        self.grpc.stop()
        self.db.dispose()


def open_storage(settings: Settings) -> tuple[Database, StagedBlobStore]:
    """The database (migrated) and the blob store FEDCOMPUTE_BLOB_STORE_URL names (a bad bucket fails first)."""
    blobs = open_blob_store(settings)
    db = Database(settings.resolved_database_url())
    db.migrate()
    return db, blobs


def build_server(
    settings: Settings, clock: Clock, ids: IdGenerator, internal_token: str, token_secret: str
) -> ServerApp:
    db, blobs = open_storage(settings)
    signer = TokenSigner(token_secret.encode())
    key_clients = [KeyClient(open_channel(a), settings.rpc_timeout_s) for a in settings.key_service_addresses]
    metrics = RpcMetrics.create("server")
    windows = Histogram(
        "fedcompute_server_retry_window_seconds",
        "Longest retry delay suggested to a turned-away device, by rejection reason.",
        ["reason"],
        buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 7200),
        registry=metrics.registry,
    )
    pace = PaceSteering(
        (settings.retry_delay_min_s, settings.retry_delay_max_s),
        (settings.retry_delay_min_s * 10, settings.retry_delay_max_s * 10),
        random.Random(),
        time.monotonic,
        windows,
    )
    tasks = TaskService(db, blobs, clock, ids, settings.max_plan_bytes)
    assignments = AssignmentService(db, clock, ids, signer, KeyRing(key_clients, clock))
    # UploadService still names LocalBlobStore, though it needs only StagedBlobStore (staging_dir, put_file, delete)
    uploads = UploadService(db, cast(LocalBlobStore, blobs), clock, ids, signer, settings.max_upload_bytes)
    resources = ResourceService(db, blobs, settings.chunk_size_bytes)
    limits = RetryLimits(settings.max_job_attempts, settings.max_round_attempts, 0.25, settings.job_backoff_max_s)
    jobs = JobService(db, blobs, clock, ids, settings.lease_s, limits)
    registrations: list[tuple[Callable[[Any, grpc.Server], None], Any, str]] = [
        (
            task_management_pb2_grpc.add_TaskManagementServiceServicer_to_server,
            TaskManagementServicer(tasks, OperatorAuthService(db, clock, ids)),
            task_management_pb2.DESCRIPTOR.services_by_name["TaskManagementService"].full_name,
        ),
        (
            task_assignment_pb2_grpc.add_TaskAssignmentServiceServicer_to_server,
            TaskAssignmentServicer(assignments, pace, settings.max_upload_bytes, settings.chunk_size_bytes),
            task_assignment_pb2.DESCRIPTOR.services_by_name["TaskAssignmentService"].full_name,
        ),
        (
            upload_pb2_grpc.add_UploadServiceServicer_to_server,
            UploadServicer(uploads),
            upload_pb2.DESCRIPTOR.services_by_name["UploadService"].full_name,
        ),
        (
            resource_pb2_grpc.add_ResourceServiceServicer_to_server,
            ResourceServicer(resources),
            resource_pb2.DESCRIPTOR.services_by_name["ResourceService"].full_name,
        ),
        (
            aggregation_pb2_grpc.add_AggregationServiceServicer_to_server,
            AggregationServicer(jobs, internal_token),
            aggregation_pb2.DESCRIPTOR.services_by_name["AggregationService"].full_name,
        ),
    ]
    server = build_grpc_server(
        f"{settings.host}:{settings.server_port}",
        registrations,
        metrics,
        settings.worker_threads,
        settings.max_message_bytes,
        settings.reuse_port,
    )
    if settings.metrics_port:
        metrics.serve_http(settings.host, settings.metrics_port)
    sweeper = DeadlineSweeper(db, clock, ids, settings.max_round_attempts)
    loop = PollingLoop("deadlines", sweeper.run_once, settings.poll_interval_s).start()
    return ServerApp(server, db, blobs, metrics, loop)
