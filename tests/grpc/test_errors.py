"""Honest errors: an exception no handler maps reaches the caller as INTERNAL (UNAVAILABLE when a database is
unreachable) with an error id and nothing of its text; the traceback is logged under that id; the RPC metric
counts the real code. Real gRPC on loopback; the fault is a service that raises."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import grpc
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import OperationalError

from fedcompute.core.clock import RandomIds, SystemClock
from fedcompute.core.records import TaskRecord
from fedcompute.core.settings import Settings
from fedcompute.rpc.auth import bearer_metadata
from fedcompute.rpc.channels import open_channel
from fedcompute.rpc.serving import build_grpc_server
from fedcompute.server.api_operators import TaskManagementServicer
from fedcompute.server.operator_auth import OperatorAuthService, Role
from fedcompute.server.tasks import TaskService
from fedcompute.store.database import Database
from fedcompute.v1 import task_management_pb2, task_management_pb2_grpc

SECRET = "SELECT token FROM tasks -- db.internal:5432"
TOKEN = "fct_" + "v" * 43


def _viewers_only(tmp_path: Path) -> OperatorAuthService:
    """Operator auth on a real database of its own, knowing one viewer token."""
    db = Database(f"sqlite:///{tmp_path / 'auth.sqlite'}")
    db.migrate()
    auth = OperatorAuthService(db, SystemClock(), RandomIds())
    auth.ensure(TOKEN, "viewer", Role.VIEWER)
    return auth


class BrokenTasks(TaskService):
    def __init__(self) -> None:  # no database at all: every call fails before reaching one
        pass

    def get(self, task_id: str) -> TaskRecord:
        if task_id == "db-down":
            raise OperationalError(SECRET, {}, ConnectionRefusedError("db.internal:5432"))
        raise RuntimeError(SECRET)

    def page(self, population: str, page_size: int, page_token: str, status: str = "") -> NoReturn:
        raise KeyError(SECRET)


@pytest.mark.parametrize(
    ("task_id", "code"), [("bug", grpc.StatusCode.INTERNAL), ("db-down", grpc.StatusCode.UNAVAILABLE)]
)
def test_unmapped_exceptions_are_internal_with_an_error_id_and_counted(
    task_id: str, code: grpc.StatusCode, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    name = task_management_pb2.DESCRIPTOR.services_by_name["TaskManagementService"].full_name
    settings = Settings(server_port=0, plaintext=True, worker_threads=2)
    server = build_grpc_server(
        settings,
        "server",
        "server_port",
        [
            (
                task_management_pb2_grpc.add_TaskManagementServiceServicer_to_server,
                TaskManagementServicer(BrokenTasks(), _viewers_only(tmp_path)),
                name,
            )
        ],
        registry,
    )
    try:
        stub = task_management_pb2_grpc.TaskManagementServiceStub(open_channel(f"127.0.0.1:{server.port}"))
        with pytest.raises(grpc.RpcError) as info:
            stub.GetTask(
                task_management_pb2.GetTaskRequest(task_id=task_id), timeout=5, metadata=bearer_metadata(TOKEN)
            )
        assert info.value.code() == code
        details = info.value.details() or ""
        assert "error id err_" in details
        assert "SELECT" not in details
        assert "5432" not in details
        error_id = details.split("error id ")[1].split(";")[0]
        logged = capfd.readouterr()
        assert error_id in logged.out + logged.err  # the traceback is in the log under the same id
        assert "Traceback" in logged.out + logged.err
        counted = registry.get_sample_value(
            "fedcompute_server_rpcs_handled_total",
            {"service": "TaskManagementService", "method": "GetTask", "code": code.name},
        )
        assert counted == 1
    finally:
        server.stop(grace=0)
