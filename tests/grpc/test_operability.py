"""Operating the server: health that follows the database, drain, reflection, rate limits, device attestation,
request ids and metrics, over real gRPC on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url

from fedcompute.core.clock import RandomIds, SystemClock
from fedcompute.core.settings import SettingError, Settings
from fedcompute.rpc.auth import bearer_metadata
from fedcompute.rpc.channels import REQUEST_ID, open_channel
from fedcompute.rpc.errors import RETRY_PUSHBACK_KEY
from fedcompute.rpc.serving import build_grpc_server
from fedcompute.server.api_operators import TaskManagementServicer
from fedcompute.server.device_attestation import load_attestor
from fedcompute.server.operator_auth import OperatorAuthService, Role
from fedcompute.store.database import Database
from fedcompute.v1 import common_pb2, task_management_pb2, task_management_pb2_grpc
from fedcompute.v1 import task_assignment_pb2 as ta
from fedcompute.v1 import task_management_pb2 as tm
from tests.conftest import fresh_postgres
from tests.harness import Harness, contribute, suite_settings, wait_for
from tests.netcut import NetCut


def _health(address: str) -> int:
    try:
        reply = health_pb2_grpc.HealthStub(open_channel(address)).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError:
        return -1
    return int(reply.status)


VIEWER_TOKEN = "fct_drain-viewer-0123456789abcdefghijklmnop"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_and_rpcs_follow_the_database(postgres_database: str, tmp_path: Path) -> None:
    """Postgres cut off mid-run: health NOT_SERVING, RPCs UNAVAILABLE with no internals; both recover when it
    returns, and nothing stored before is lost."""
    url = make_url(fresh_postgres(postgres_database))
    cut = NetCut(url.host or "127.0.0.1", url.port or 5432)
    through = url.set(port=cut.port).render_as_string(hide_password=False)
    harness = Harness.start(suite_settings(tmp_path / "w", through), aggregator=False)
    try:
        task = harness.create_task("netcut")
        address = harness.suite.server_address
        assert _health(address) == SERVING
        cut.cut()
        wait_for(lambda: _health(address) == NOT_SERVING, 30, "health to follow the database down")
        with pytest.raises(grpc.RpcError) as info:
            harness.operators.list_tasks(tm.ListTasksRequest())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        details = info.value.details() or ""
        assert "retry later" in details
        for internal in ("psycopg", "SELECT", str(url.port), "Traceback", "connection"):
            assert internal not in details
        cut.restore()
        wait_for(lambda: _health(address) == SERVING, 30, "health to follow the database back up")
        assert harness.task(task.task_id).task_id == task.task_id  # nothing stored was lost
    finally:
        harness.stop()
        cut.close()


class _SlowTasks:
    """A TaskService stand-in whose ListTasks takes a while (the call in flight during a drain)."""

    def page(self, population: str, page_size: int, page_token: str, status: str = "") -> tuple[list[Any], str]:
        time.sleep(1.0)
        return [], ""


def test_stop_drains_in_flight_rpcs_and_refuses_new_ones(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'auth.sqlite'}")
    db.migrate()
    auth = OperatorAuthService(db, SystemClock(), RandomIds())
    auth.ensure(VIEWER_TOKEN, "viewer", Role.VIEWER)
    settings = Settings(server_port=0, plaintext=True, worker_threads=4)
    servicer = TaskManagementServicer(_SlowTasks(), auth)  # type: ignore[arg-type]
    name = task_management_pb2.DESCRIPTOR.services_by_name["TaskManagementService"].full_name
    server = build_grpc_server(
        settings, "server", "server_port",
        [(task_management_pb2_grpc.add_TaskManagementServiceServicer_to_server, servicer, name)],
        CollectorRegistry(),
    )  # fmt: skip
    address = f"127.0.0.1:{server.port}"
    stub = task_management_pb2_grpc.TaskManagementServiceStub(open_channel(address))
    results: list[object] = []
    viewer = bearer_metadata(VIEWER_TOKEN)
    caller = threading.Thread(
        target=lambda: results.append(stub.ListTasks(tm.ListTasksRequest(), timeout=10, metadata=viewer))
    )
    caller.start()
    time.sleep(0.3)  # the call is in flight
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 5.0})
    stopper.start()
    wait_for(lambda: server.draining, 5, "the drain to start")
    status = server.health.Check(health_pb2.HealthCheckRequest(), None).status  # type: ignore[arg-type]
    assert status == NOT_SERVING
    caller.join(10)
    stopper.join(10)
    assert len(results) == 1  # the in-flight call finished normally inside the grace
    with pytest.raises(grpc.RpcError) as info:
        stub.ListTasks(tm.ListTasksRequest(), timeout=2, metadata=viewer)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    db.dispose()


def _services(responses: Any) -> set[str]:
    return {s.name for r in responses for s in r.list_services_response.service}


def test_reflection_v1_and_v1alpha(harness: Harness) -> None:
    channel = open_channel(harness.suite.server_address)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    alpha = _services(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])))
    v1_call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    v1 = _services(v1_call(iter([request]), timeout=5))
    assert alpha == v1
    for service in (
        "fedcompute.v1.TaskAssignmentService", "fedcompute.v1.TaskManagementService", "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
    ):  # fmt: skip
        assert service in v1
    # v1 describes itself too (tools fetch the reflection service's own descriptor)
    lookup = reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")
    files = list(v1_call(iter([lookup]), timeout=5))
    assert files[0].file_descriptor_response.file_descriptor_proto


def test_request_ids_are_returned_to_callers(harness: Harness) -> None:
    stub = task_management_pb2_grpc.TaskManagementServiceStub(open_channel(harness.suite.server_address))
    auth = (("authorization", f"Bearer {harness.suite.settings.operator_token or _token(harness)}"),)
    _, call = stub.ListTasks.with_call(tm.ListTasksRequest(), metadata=(*auth, (REQUEST_ID, "req_mine")), timeout=5)
    assert (REQUEST_ID, "req_mine") in tuple(call.trailing_metadata())  # in the trailers, with the status
    _, call = stub.ListTasks.with_call(tm.ListTasksRequest(), metadata=auth, timeout=5)
    sent = dict(call.trailing_metadata())[REQUEST_ID]
    assert str(sent).startswith("req_")  # the typed channel's id, or one the server made
    bare = task_management_pb2_grpc.TaskManagementServiceStub(grpc.insecure_channel(harness.suite.server_address))
    _, call = bare.ListTasks.with_call(tm.ListTasksRequest(), metadata=auth, timeout=5)  # no id sent
    assert str(dict(call.trailing_metadata())[REQUEST_ID]).startswith("req_")  # the one the server made
    with pytest.raises(grpc.RpcError) as refused:  # an error's trailers carry it too
        stub.GetTask(tm.GetTaskRequest(task_id="task_missing"), metadata=(*auth, (REQUEST_ID, "req_err")), timeout=5)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    trailers: dict[str, Any] = dict(refused.value.trailing_metadata() or ())  # type: ignore[arg-type]
    assert trailers[REQUEST_ID] == "req_err"


def test_each_methods_calls_are_counted_by_code_and_timed(harness: Harness) -> None:
    """Every call of a method counts in its own children of the RPC metrics (started, handled by status code,
    latency, in flight back to 0), whichever calls came before: 4 OK and 3 NOT_FOUND, on two methods (the suite's
    own components list tasks too: those counts are at least ours)."""
    stub = task_management_pb2_grpc.TaskManagementServiceStub(open_channel(harness.suite.server_address))
    auth = (("authorization", f"Bearer {harness.suite.settings.operator_token or _token(harness)}"),)
    registry = harness.suite.server.registry

    def sample(name: str, method: str, **labels: str) -> float:
        value = registry.get_sample_value(name, {"service": "TaskManagementService", "method": method, **labels})
        return value or 0.0

    before = {m: sample("fedcompute_server_rpcs_started_total", m) for m in ("ListTasks", "GetTask")}
    for _ in range(4):
        stub.ListTasks(tm.ListTasksRequest(), metadata=auth, timeout=5)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTask(tm.GetTaskRequest(task_id="task_missing"), metadata=auth, timeout=5)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert sample("fedcompute_server_rpcs_started_total", "ListTasks") - before["ListTasks"] >= 4  # the suite's too
    assert sample("fedcompute_server_rpcs_started_total", "GetTask") - before["GetTask"] == 3
    assert sample("fedcompute_server_rpcs_handled_total", "GetTask", code="NOT_FOUND") == 3
    assert sample("fedcompute_server_rpcs_handled_total", "GetTask", code="OK") == 0
    assert sample("fedcompute_server_rpcs_handled_total", "ListTasks", code="OK") >= 4
    assert sample("fedcompute_server_rpc_duration_seconds_count", "GetTask") == 3
    # the suite's own dealer lists tasks on its own clock: one of its calls may be in flight at this moment
    wait_for(lambda: sample("fedcompute_server_rpcs_in_flight", "ListTasks") == 0, 10, "ListTasks calls to end")
    assert sample("fedcompute_server_rpcs_in_flight", "GetTask") == 0


def _token(harness: Harness) -> str:
    from fedcompute.core.secrets import operator_token

    return operator_token(harness.suite.settings)


def test_a_burst_beyond_the_rate_limit_is_resource_exhausted_with_a_retry_delay(
    database_url: str, tmp_path: Path
) -> None:
    settings = suite_settings(tmp_path / "w", database_url, device_rate_per_s=2.0, device_rate_burst=3)
    harness = Harness.start(settings, aggregator=False)
    try:
        refused: list[grpc.RpcError] = []
        answered = 0
        began = time.monotonic()
        for _ in range(8):
            try:
                harness.check_in("limited")
                answered += 1
            except grpc.RpcError as exc:
                refused.append(exc)
        refilled = int((time.monotonic() - began) * 2.0)  # tokens the bucket regained meanwhile (a loaded machine)
        assert 3 <= answered <= 3 + refilled  # the burst
        assert refused
        assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        trailers: dict[str, Any] = dict(refused[0].trailing_metadata() or ())  # type: ignore[arg-type]
        delay_ms = int(trailers[RETRY_PUSHBACK_KEY])
        assert 0 < delay_ms <= 1000
        assert "retry in" in (refused[0].details() or "")
        for _ in range(10):  # operators are not rate limited as devices are
            harness.operators.list_tasks(tm.ListTasksRequest())
        time.sleep(delay_ms / 1000 + 0.1)
        harness.check_in("limited")  # a token again after the delay
        registry = harness.suite.server.registry
        handled = {
            s.labels["code"]: s.value
            for m in registry.collect()
            if m.name == "fedcompute_server_rpcs_handled"
            for s in m.samples
            if s.name.endswith("_total") and s.labels["method"] == "CreateTaskAssignment"
        }
        assert handled["RESOURCE_EXHAUSTED"] == len(refused)
        assert "INTERNAL" not in handled
        assert "UNKNOWN" not in handled
        checkins = registry.get_sample_value("fedcompute_server_checkins_total", {"result": "rejected"})
        assert checkins == answered + 1  # every answered check-in was counted (no task: rejected)
        reason = registry.get_sample_value("fedcompute_server_checkin_rejections_total", {"reason": "no_active_task"})
        assert reason == answered + 1
    finally:
        harness.stop()


def test_device_attestation_hook_refuses_unbelieved_devices(database_url: str, tmp_path: Path) -> None:
    settings = suite_settings(tmp_path / "w", database_url, device_attestation="tests.attestors:genuine_only")
    harness = Harness.start(settings, aggregator=False)
    try:
        harness.create_task("attested")
        version = common_pb2.ClientVersion(version_code="1.0.0")
        with pytest.raises(grpc.RpcError) as info:
            harness.check_in("attested")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "device attestation failed" in (info.value.details() or "")
        genuine = harness.assignments.create_task_assignment(
            ta.CreateTaskAssignmentRequest(
                population_name="attested", client_version=version, device_attestation=b"genuine"
            )
        )
        assert genuine.task_assignment.assignment_id
    finally:
        harness.stop()


@pytest.mark.parametrize(
    ("spec", "problem"),
    [("no-colon", "MODULE:FACTORY"), ("tests.nowhere:make", "cannot load"), ("tests.attestors:GenuineOnly.check", "")],
)
def test_a_bad_device_attestation_setting_names_itself(spec: str, problem: str) -> None:
    with pytest.raises(SettingError) as info:
        load_attestor(spec)
    assert str(info.value).startswith("FEDCOMPUTE_DEVICE_ATTESTATION: ")
    assert problem in str(info.value)


def test_a_rate_limited_device_upload_waits_out_the_pushback_and_lands(database_url: str, tmp_path: Path) -> None:
    """The reference device honours grpc-retry-pushback-ms on its upload calls instead of losing the update."""
    settings = suite_settings(tmp_path / "w", database_url, device_rate_per_s=3.0, device_rate_burst=2)
    harness = Harness.start(settings, aggregator=False)
    try:
        harness.create_task("paced")
        contribute(harness, "paced")  # check-in, report, then QueryWriteStatus and Write beyond the burst
        registry = harness.suite.server.registry
        limited = sum(
            s.value
            for m in registry.collect()
            if m.name == "fedcompute_server_rpcs_handled"
            for s in m.samples
            if s.name.endswith("_total") and s.labels["code"] == "RESOURCE_EXHAUSTED"
        )
        assert limited >= 1  # it was limited on the way
        assert registry.get_sample_value("fedcompute_server_uploads_completed_total") == 1  # and still landed
    finally:
        harness.stop()


def test_a_servers_pushback_is_never_waited_past_the_upload_deadline() -> None:
    """A hostile or misconfigured server answers RESOURCE_EXHAUSTED asking for a day's wait (or for a number of
    5,000 digits): the reference device waits at most until its upload deadline, then its tries stop (found by a
    review, 2026-12-02: it would have slept the day, or raised ValueError on the digits)."""
    import time as clock

    from tenacity import RetryCallState

    from fedcompute.clients.device import _upload_wait
    from fedcompute.rpc.errors import RETRY_PUSHBACK_KEY

    class Pushed(grpc.RpcError, grpc.Call):  # type: ignore[misc]
        def __init__(self, millis: str) -> None:
            self._millis = millis

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def trailing_metadata(self) -> Any:
            return ((RETRY_PUSHBACK_KEY, self._millis),)

    def waited(millis: str, deadline_unix: float) -> float:
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.set_exception((Pushed, Pushed(millis), None))
        return _upload_wait(state, deadline_unix=deadline_unix)

    soon = clock.time() + 2.0
    assert waited("86400000", soon) <= 2.0  # not the day asked for
    assert waited("86400000", clock.time() - 1) == 0.0  # past the deadline: no wait, the stop ends the tries
    assert waited("9" * 5000, soon) <= 2.0  # the digits are not parsed: backoff, within the deadline
    assert waited("300", 0.0) >= 0.3  # no deadline named: the pushback as asked
