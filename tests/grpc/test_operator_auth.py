"""Operator auth over real gRPC on loopback, on SQLite and Postgres: every TaskManagementService RPC needs an
operator token whose role allows it; refusals store nothing; tokens are stored only as their sha256."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from sqlalchemy import MetaData, select
from typer.testing import CliRunner

from fedcompute.attestation.measure import measure
from fedcompute.cli import app
from fedcompute.clients.dealer import operator_key_clients
from fedcompute.clients.operator import create_task
from fedcompute.clients.typed import TaskManagementClient
from fedcompute.core.clock import RandomIds, SystemClock
from fedcompute.core.secrets import key_admin_token, operator_token
from fedcompute.keys.trust import load_trusted
from fedcompute.rpc.channels import open_channel
from fedcompute.server.operator_auth import OperatorAuthService
from fedcompute.store.models import OperatorTokenRow, StatusHistoryRow, TaskRow
from fedcompute.v1 import task_management_pb2 as tm
from fedcompute.v1 import task_management_pb2_grpc
from tests.harness import Harness, task_spec, wait_for

VIEWER, OPERATOR, ADMIN = tm.OPERATOR_ROLE_VIEWER, tm.OPERATOR_ROLE_OPERATOR, tm.OPERATOR_ROLE_ADMIN


def _client(harness: Harness, token: str = "") -> TaskManagementClient:
    return TaskManagementClient(open_channel(harness.suite.server_address), 10.0, token)


def _token(harness: Harness, name: str, role: tm.OperatorRole.ValueType) -> str:
    """A new token made by the suite's admin (`up`'s own token) over the admin RPC."""
    made = harness.operators.create_operator_token(tm.CreateOperatorTokenRequest(name=name, role=role))
    assert made.token.startswith("fct_")
    return made.token


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


def _create(harness: Harness, client: TaskManagementClient, population: str) -> tm.Task:
    """As `fedcompute task create` does: register the policy with the key services, then CreateTask."""
    settings = harness.suite.settings
    return create_task(
        client,
        operator_key_clients(settings, key_admin_token(settings)),
        load_trusted(settings.trusted_providers_path()),
        settings.threshold,
        task_spec(population),
        settings.allowed_measurements or [measure()],
    )


def _unauthenticated(client: TaskManagementClient) -> bool:
    try:
        client.list_tasks(tm.ListTasksRequest())
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def _task_rows(harness: Harness) -> int:
    with harness.suite.server.db.transaction() as s:
        return len(list(s.scalars(select(TaskRow.id))))


def _every_rpc(client: TaskManagementClient) -> dict[str, Callable[[], Any]]:
    return {
        "CreateTask": lambda: client.create_task(tm.CreateTaskRequest(spec=task_spec("nobody"))),
        "GetTask": lambda: client.get_task(tm.GetTaskRequest(task_id="task_x")),
        "ListTasks": lambda: client.list_tasks(tm.ListTasksRequest()),
        "CancelTask": lambda: client.cancel_task(tm.CancelTaskRequest(task_id="task_x")),
        "ListIterations": lambda: client.list_iterations(tm.ListIterationsRequest(task_id="task_x")),
        "ListModelVersions": lambda: client.list_model_versions(tm.ListModelVersionsRequest(task_id="task_x")),
        "CreateOperatorToken": lambda: client.create_operator_token(
            tm.CreateOperatorTokenRequest(name="mallory", role=ADMIN)
        ),
        "RevokeOperatorToken": lambda: client.revoke_operator_token(tm.RevokeOperatorTokenRequest(name_or_id="up")),
        "ListOperatorTokens": lambda: client.list_operator_tokens(tm.ListOperatorTokensRequest()),
    }


def test_every_rpc_without_a_valid_token_is_unauthenticated_and_stores_nothing(harness: Harness) -> None:
    service = tm.DESCRIPTOR.services_by_name["TaskManagementService"]
    for token in ("", "fct_" + "A" * 43, "not-a-token"):
        calls = _every_rpc(_client(harness, token))
        assert sorted(calls) == sorted(m.name for m in service.methods)  # every RPC of the service
        for name, call in calls.items():
            assert _code(call) == grpc.StatusCode.UNAUTHENTICATED, (token, name)
    stub = task_management_pb2_grpc.TaskManagementServiceStub(open_channel(harness.suite.server_address))
    for header in ("Basic dXA6dXA=", "Bearer", "Bearer    "):  # another scheme, or no token after the scheme
        with pytest.raises(grpc.RpcError) as info:
            stub.ListTasks(tm.ListTasksRequest(), timeout=10, metadata=(("authorization", header),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "FEDCOMPUTE_OPERATOR_TOKEN" in (info.value.details() or "")
    assert _task_rows(harness) == 0
    listed = harness.operators.list_operator_tokens(tm.ListOperatorTokensRequest()).operator_tokens
    assert [(t.name, t.role) for t in listed] == [("up", ADMIN)]  # mallory was never made; up never revoked


def test_a_viewer_reads_but_cannot_create_or_cancel_and_an_operator_can(harness: Harness) -> None:
    viewer = _client(harness, _token(harness, "vera", VIEWER))
    operator = _client(harness, _token(harness, "otto", OPERATOR))
    # A complete, valid CreateTask (policy registered and signed by the key services) from a viewer: refused.
    with pytest.raises(grpc.RpcError) as info:
        _create(harness, viewer, "viewed")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator role" in (info.value.details() or "")
    assert _task_rows(harness) == 0  # nothing stored
    task = _create(harness, operator, "operated")
    assert viewer.get_task(tm.GetTaskRequest(task_id=task.task_id)).task.status == tm.TASK_STATUS_OPEN
    assert [t.task_id for t in viewer.list_tasks(tm.ListTasksRequest()).tasks] == [task.task_id]
    assert len(viewer.list_iterations(tm.ListIterationsRequest(task_id=task.task_id)).iterations) == 1
    assert len(viewer.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions) == 1
    cancel = tm.CancelTaskRequest(task_id=task.task_id, reason="viewer says so")
    assert _code(lambda: viewer.cancel_task(cancel)) == grpc.StatusCode.PERMISSION_DENIED
    assert viewer.get_task(tm.GetTaskRequest(task_id=task.task_id)).task.status == tm.TASK_STATUS_OPEN
    raw = tm.CreateTaskRequest(spec=task_spec("raw"))
    assert _code(lambda: viewer.create_task(raw)) == grpc.StatusCode.PERMISSION_DENIED
    assert _task_rows(harness) == 1
    canceled = operator.cancel_task(tm.CancelTaskRequest(task_id=task.task_id, reason="done")).task
    assert canceled.status == tm.TASK_STATUS_CANCELED
    # Token administration is the admin's alone, for viewers and operators alike.
    for client in (viewer, operator):
        for name, call in _every_rpc(client).items():
            if name.endswith(("OperatorToken", "OperatorTokens")):
                assert _code(call) == grpc.StatusCode.PERMISSION_DENIED, name
    assert {t.name for t in harness.operators.list_operator_tokens(tm.ListOperatorTokensRequest()).operator_tokens} == {
        "up",
        "vera",
        "otto",
    }


def test_unknown_and_revoked_tokens_are_unauthenticated(harness: Harness) -> None:
    unknown = _client(harness, "fct_" + "x" * 43)
    assert _code(lambda: unknown.list_tasks(tm.ListTasksRequest())) == grpc.StatusCode.UNAUTHENTICATED
    # Revoked through the admin RPC: refused at once (the server drops it from its cache).
    token = _token(harness, "ci", OPERATOR)
    ci = _client(harness, token)
    ci.list_tasks(tm.ListTasksRequest())  # verified, and now cached
    revoked = harness.operators.revoke_operator_token(tm.RevokeOperatorTokenRequest(name_or_id="ci"))
    assert [(t.name, t.HasField("revoked_time")) for t in revoked.operator_tokens] == [("ci", True)]
    assert _code(lambda: ci.list_tasks(tm.ListTasksRequest())) == grpc.StatusCode.UNAUTHENTICATED
    again = harness.operators.revoke_operator_token(tm.RevokeOperatorTokenRequest(name_or_id="ci"))
    assert again.operator_tokens[0].revoked_time == revoked.operator_tokens[0].revoked_time  # idempotent
    # Revoked elsewhere (another replica, or `fedcompute token revoke` on the database): within the 1 s cache.
    other = _client(harness, _token(harness, "ci", OPERATOR))  # the name is free again once revoked
    other.list_tasks(tm.ListTasksRequest())
    elsewhere = OperatorAuthService(harness.suite.server.db, SystemClock(), RandomIds())
    records = elsewhere.revoke("ci", by="test")  # by name: both "ci" tokens, the first one already revoked
    assert [(r.name, r.revoked_at is not None) for r in records] == [("ci", True), ("ci", True)]
    wait_for(lambda: _unauthenticated(other), 2.5, "the revocation to reach the server")
    missing = tm.RevokeOperatorTokenRequest(name_or_id="nobody")
    assert _code(lambda: harness.operators.revoke_operator_token(missing)) == grpc.StatusCode.NOT_FOUND


def test_token_administration_refuses_bad_requests_and_stores_nothing(harness: Harness) -> None:
    admin = harness.operators
    _token(harness, "alice", VIEWER)
    before = list(admin.list_operator_tokens(tm.ListOperatorTokensRequest()).operator_tokens)
    for name, role, code in [
        ("alice", OPERATOR, grpc.StatusCode.FAILED_PRECONDITION),  # an active token has the name
        ("bob", tm.OPERATOR_ROLE_UNSPECIFIED, grpc.StatusCode.INVALID_ARGUMENT),
        ("", VIEWER, grpc.StatusCode.INVALID_ARGUMENT),
        ("a b", VIEWER, grpc.StatusCode.INVALID_ARGUMENT),
        ("x" * 129, VIEWER, grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        request = tm.CreateOperatorTokenRequest(name=name, role=role)
        with pytest.raises(grpc.RpcError) as info:
            admin.create_operator_token(request)
        assert info.value.code() == code, (name, role)
    assert list(admin.list_operator_tokens(tm.ListOperatorTokensRequest()).operator_tokens) == before
    # An admin made over the RPC can administer tokens in turn.
    second = _client(harness, _token(harness, "root-2", ADMIN))
    second.revoke_operator_token(tm.RevokeOperatorTokenRequest(name_or_id="alice"))
    listed = {t.name: t for t in admin.list_operator_tokens(tm.ListOperatorTokensRequest()).operator_tokens}
    assert listed["alice"].HasField("revoked_time")
    assert not listed["root-2"].HasField("revoked_time")


def test_tokens_are_stored_only_as_their_sha256(harness: Harness) -> None:
    tokens = [operator_token(harness.suite.settings)] + [
        _token(harness, f"t{i}", role) for i, role in enumerate((VIEWER, OPERATOR, ADMIN))
    ]
    harness.operators.revoke_operator_token(tm.RevokeOperatorTokenRequest(name_or_id="t1"))
    engine = harness.suite.server.db.engine
    metadata = MetaData()
    metadata.reflect(engine)
    stored: list[str] = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(table.select()):
                stored.extend(str(v) for v in row)
    dump = "\n".join(stored)
    for token in tokens:
        assert token not in dump
        assert token[4:20] not in dump  # not even a part of it
        assert hashlib.sha256(token.encode()).hexdigest() in dump
    with harness.suite.server.db.transaction() as s:
        assert len(list(s.scalars(select(OperatorTokenRow.id)))) == 4
        history = [
            (h.from_status, h.to_status)
            for h in s.scalars(select(StatusHistoryRow).where(StatusHistoryRow.entity == "operator_token"))
        ]
    assert history.count((None, "ACTIVE")) == 4
    assert history.count(("ACTIVE", "REVOKED")) == 1


def test_token_cli_on_the_database_and_over_the_admin_rpcs(harness: Harness) -> None:
    settings = harness.suite.settings
    env = {
        "FEDCOMPUTE_WORKDIR": str(settings.workdir),
        "FEDCOMPUTE_DATABASE_URL": settings.resolved_database_url(),
        "FEDCOMPUTE_PLAINTEXT": "true",
    }
    runner = CliRunner(env=env)
    created = runner.invoke(app, ["token", "create", "--name", "ci", "--role", "operator"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert created.stdout == token + "\n"  # the token alone on stdout
    assert token.startswith("fct_")
    ci = _client(harness, token)
    task = _create(harness, ci, "from-cli")
    assert ci.get_task(tm.GetTaskRequest(task_id=task.task_id)).task.task_id == task.task_id
    listed = runner.invoke(app, ["token", "list"])
    assert listed.exit_code == 0, listed.output
    assert token not in listed.stdout
    assert "ci" in listed.stdout
    bad_role = runner.invoke(app, ["token", "create", "--name", "x", "--role", "root"])
    assert bad_role.exit_code == 2
    duplicate = runner.invoke(app, ["token", "create", "--name", "ci", "--role", "viewer"])
    assert duplicate.exit_code == 1
    assert "token not created: a token named 'ci' is active" in duplicate.stderr
    # Over the admin RPCs: FEDCOMPUTE_OPERATOR_TOKEN must be an admin's.
    server = ["--server", harness.suite.server_address]
    no_token = runner.invoke(app, ["token", "create", "--name", "v", "--role", "viewer", *server])
    assert no_token.exit_code == 1
    assert "UNAUTHENTICATED" in no_token.stderr
    assert "set FEDCOMPUTE_OPERATOR_TOKEN" in no_token.stderr
    as_operator = CliRunner(env={**env, "FEDCOMPUTE_OPERATOR_TOKEN": token})
    denied = as_operator.invoke(app, ["token", "list", *server])
    assert denied.exit_code == 1
    assert "PERMISSION_DENIED" in denied.stderr
    as_admin = CliRunner(env={**env, "FEDCOMPUTE_OPERATOR_TOKEN": operator_token(settings)})
    made = as_admin.invoke(app, ["token", "create", "--name", "v", "--role", "viewer", *server])
    assert made.exit_code == 0, made.output
    viewer = _client(harness, made.stdout.strip())
    assert [t.task_id for t in viewer.list_tasks(tm.ListTasksRequest()).tasks] == [task.task_id]
    assert '"name": "v"' in as_admin.invoke(app, ["token", "list", *server]).stdout
    revoked = as_admin.invoke(app, ["token", "revoke", "v", *server])
    assert revoked.exit_code == 0, revoked.output
    assert _code(lambda: viewer.list_tasks(tm.ListTasksRequest())) == grpc.StatusCode.UNAUTHENTICATED
    # On the database: another process than the server, so the revocation reaches it within its 1 s cache.
    assert runner.invoke(app, ["token", "revoke", "ci"]).exit_code == 0
    wait_for(lambda: _unauthenticated(ci), 2.5, "the CLI's revocation to reach the server")
    assert runner.invoke(app, ["token", "revoke", "nobody"]).exit_code == 1
    # As its own process (nothing configured logging beforehand): still the token alone on stdout.
    alone = subprocess.run(
        [sys.executable, "-m", "fedcompute.cli", "token", "create", "--name", "proc", "--role", "viewer"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    assert re.fullmatch(r"fct_[A-Za-z0-9_-]{43}\n", alone.stdout), alone.stdout
    assert _client(harness, alone.stdout.strip()).list_tasks(tm.ListTasksRequest()).tasks
