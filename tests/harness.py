"""A running suite for tests: real gRPC servers on loopback ports, typed clients, and device helpers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from fedcompute.clients.device import Trust
from fedcompute.clients.typed import (
    AggregationClient,
    KeyClient,
    ResourceClient,
    TaskAssignmentClient,
    TaskManagementClient,
    UploadClient,
)
from fedcompute.core.secrets import operator_token, worker_token
from fedcompute.core.settings import Settings
from fedcompute.rpc.channels import channel_for
from fedcompute.suite import Suite, start_suite
from fedcompute.v1 import common_pb2
from fedcompute.v1 import task_assignment_pb2 as ta
from fedcompute.v1 import task_management_pb2 as tm


def suite_settings(workdir: Path, database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "workdir": workdir,
        "database_url": database_url,
        "server_port": 0,
        "key_service_port": 0,
        "verifier_port": 0,
        "retry_delay_min_s": 0.05,
        "retry_delay_max_s": 0.2,
        "poll_interval_s": 0.05,
        "housekeeping_interval_s": 0.05,  # deadline sweeps and health flips at once: tests wait less
        "rpc_timeout_s": 20.0,
        "lease_s": 30.0,
        "log_json": False,
        "key_service_processes": False,
        "job_backoff_max_s": 0.5,
        "plaintext": True,
        "health_port": 0,
        "device_rate_per_s": 0.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class Harness:
    suite: Suite
    operators: TaskManagementClient
    assignments: TaskAssignmentClient
    uploads: UploadClient
    resources: ResourceClient
    jobs: AggregationClient
    keys: KeyClient

    @classmethod
    def start(cls, settings: Settings, aggregator: bool = True) -> Harness:
        return cls.attach(start_suite(settings, aggregator=aggregator))

    @classmethod
    def attach(cls, suite: Suite) -> Harness:
        channel = channel_for(suite.settings, suite.server_address)
        token = worker_token(suite.settings)
        return cls(
            suite,
            TaskManagementClient(channel, 20.0, operator_token(suite.settings)),
            TaskAssignmentClient(channel, 20.0),
            UploadClient(channel, 20.0),
            ResourceClient(channel, 20.0),
            AggregationClient(channel, 20.0, token),
            KeyClient(channel_for(suite.settings, suite.key_addresses[0]), 20.0, token),
        )

    def create_task(self, population: str = "pop", **fields: Any) -> tm.Task:
        """As the operator does: register the access policy with the key services, then create the task."""
        task = self.suite.create_task(task_spec(population, **fields))
        if population.strip():
            self.wait_for_key(population)
        return task

    def create_task_raw(self, population: str = "pop", **fields: Any) -> tm.Task:
        """CreateTask straight at the server with no access policy (bad-input tests of the server itself)."""
        return self.operators.create_task(tm.CreateTaskRequest(spec=task_spec(population, **fields))).task

    def wait_for_key(self, population: str) -> None:
        """The dealer runs a key ceremony for a new population within a poll interval or two."""
        from fedcompute.v1 import key_pb2

        request = key_pb2.GetPublicKeysRequest(population_name=population)
        wait_for(lambda: bool(self.keys.get_public_keys(request).keys), 30, f"a key for {population}")

    def trust(self) -> Trust:
        from fedcompute.keys.trust import load_trusted

        return Trust(load_trusted(self.suite.settings.trusted_providers_path()), self.suite.settings.threshold)

    def check_in(self, population: str = "pop", version: str = "1.0.0") -> ta.CreateTaskAssignmentResponse:
        return self.assignments.create_task_assignment(
            ta.CreateTaskAssignmentRequest(
                population_name=population, client_version=common_pb2.ClientVersion(version_code=version)
            )
        )

    def report(
        self, a: ta.TaskAssignment, result: ta.ReportResult.ValueType = ta.REPORT_RESULT_COMPLETED
    ) -> ta.ReportResultResponse:
        from fedcompute.clients.device import report_request

        return self.assignments.report_result(report_request(a, result))

    def task(self, task_id: str) -> tm.Task:
        return self.operators.get_task(tm.GetTaskRequest(task_id=task_id)).task

    def iterations(self, task_id: str) -> list[tm.Iteration]:
        return list(self.operators.list_iterations(tm.ListIterationsRequest(task_id=task_id)).iterations)

    def stop(self) -> None:
        self.suite.stop()

    def stop_model_updater(self) -> None:
        """Stop the suite's model updater (a test runs one of its own): it applies succeeded jobs and sweeps
        orphan blobs at its first pass and then every ten minutes of the clock, whenever its thread gets to it. The
        loop's stop waits out a pass under way."""
        for loop in self.suite.loops:
            if loop.name == "modelupdater":
                loop.stop()


def task_spec(population: str = "pop", **fields: Any) -> tm.TaskSpec:
    spec = tm.TaskSpec(
        population_name=population,
        model_architecture="digits-linear-v1",
        rounds=1,
        report_goal=2,
        max_cohort=3,
        hyperparameters=tm.TrainingHyperparameters(local_epochs=1, batch_size=16, learning_rate=0.1),
    )
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(spec, name).CopyFrom(value)
        else:
            setattr(spec, name, value)
    return spec


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def zero_update(
    arch_id: str = "digits-linear-v1", examples: int = 10, value: float = 0.0, metrics: dict[str, Any] | None = None
) -> bytes:
    """A plaintext update (safetensors delta) of the right schema, with the device's metrics if given."""
    import torch

    from fedcompute.core import checkpoints

    weights = checkpoints.initial_weights(arch_id, seed=0)
    meta: dict[str, object] = {"num_examples": examples}
    if metrics is not None:
        meta["metrics"] = metrics
    return checkpoints.encode({k: torch.full_like(v, value) for k, v in weights.items()}, meta)


def sealed(a: ta.TaskAssignment, plaintext: bytes | None = None, **context_changes: object) -> bytes:
    """The envelope a well-behaved device would upload for assignment ``a`` (context optionally altered)."""
    import dataclasses

    from fedcompute.clients.device import context_of
    from fedcompute.keys.envelope import seal_contribution

    context = dataclasses.replace(context_of(a), **context_changes)  # type: ignore[arg-type]
    payload = zero_update() if plaintext is None else plaintext
    return seal_contribution(payload, context, a.encryption_key.public_key).SerializeToString()


def contribute(harness: Harness, population: str, plaintext: bytes | None = None) -> bytes:
    """One well-behaved device's whole turn, by hand; returns the plaintext update it sealed."""
    from fedcompute.clients.device import upload
    from fedcompute.keys.statement import check_trusted

    a = harness.check_in(population).task_assignment
    assert a.assignment_id, "no assignment"
    trust = harness.trust()
    check_trusted(a.encryption_key, trust.providers, trust.threshold)
    payload = zero_update(value=0.01) if plaintext is None else plaintext
    upload(harness.uploads, harness.report(a).upload_instruction, sealed(a, payload))
    return payload


def upload_for(harness: Harness, population: str, make: Callable[[ta.TaskAssignment], bytes]) -> None:
    """A device's turn whose upload bytes come from ``make`` (for contributions the aggregator must reject)."""
    from fedcompute.clients.device import upload

    a = harness.check_in(population).task_assignment
    upload(harness.uploads, harness.report(a).upload_instruction, make(a))
