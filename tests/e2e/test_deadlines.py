"""Rounds always finish: devices that vanish are timed out and their slots freed, late reports and uploads get a
clear answer and count nothing, a round at its deadline aggregates what it has if that reaches min_clients, and
a population that never reaches quorum is retried and then failed with the reason. A fake clock drives the
deadlines of a real suite (real gRPC, SQLite and Postgres)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, select

from fedcompute.clients.device import upload
from fedcompute.core.clock import FakeClock, RandomIds
from fedcompute.modelupdater.updater import ModelUpdater
from fedcompute.store.models import UploadRow
from fedcompute.suite import start_suite
from fedcompute.v1 import common_pb2, upload_pb2
from fedcompute.v1 import task_assignment_pb2 as ta
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, contribute, sealed, suite_settings, wait_for

POP = "deadlines"
DEADLINES = {"local_compute_deadline_s": 30, "upload_deadline_s": 30, "round_deadline_s": 300}


@pytest.fixture
def clocked(tmp_path: Path, database_url: str) -> Iterator[tuple[Harness, FakeClock]]:
    clock = FakeClock(datetime.now(UTC))
    settings = suite_settings(tmp_path / "w", database_url, max_round_attempts=2, staging_sweep_s=5)
    harness = Harness.attach(start_suite(settings, clock=clock, aggregator=False))
    yield harness, clock
    harness.stop()


def _reason(response: ta.CreateTaskAssignmentResponse | ta.ReportResultResponse) -> str:
    return common_pb2.RejectionReason.Name(response.rejection_info.reason)


def test_vanished_devices_are_timed_out_and_their_slots_freed(clocked: tuple[Harness, FakeClock]) -> None:
    harness, clock = clocked
    task = harness.create_task(POP, report_goal=2, max_cohort=2, **DEADLINES)
    first = harness.check_in(POP).task_assignment
    reported = harness.check_in(POP).task_assignment
    instruction = harness.report(reported).upload_instruction  # reports COMPLETED, then never uploads
    assert _reason(harness.check_in(POP)) == "REJECTION_REASON_NO_TASK_AVAILABLE"  # the cohort is full
    clock.advance(timedelta(seconds=31))
    wait_for(lambda: harness.iterations(task.task_id)[0].assigned == 0, 30, "both slots freed")
    assert harness.check_in(POP).task_assignment.assignment_id  # a new device gets a slot at once
    assert _reason(harness.report(first)) == "REJECTION_REASON_RESULT_NOT_NEEDED"
    with pytest.raises(grpc.RpcError) as info:
        upload(harness.uploads, instruction, sealed(reported))  # comes back after its upload deadline
    assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)
    assert harness.iterations(task.task_id)[0].completed_uploads == 0


def test_an_interrupted_upload_past_its_deadline_is_abandoned(
    clocked: tuple[Harness, FakeClock], database_url: str
) -> None:
    harness, clock = clocked
    task = harness.create_task(POP, report_goal=2, max_cohort=3, **DEADLINES)
    a = harness.check_in(POP).task_assignment
    instruction = harness.report(a).upload_instruction
    data = sealed(a)
    half = upload_pb2.WriteRequest(
        resource_name=instruction.resource_name, upload_token=instruction.upload_token, write_offset=0,
        data=data[: len(data) // 2], finish_write=False,
        metadata=upload_pb2.UploadMetadata(total_size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest()),
    )  # fmt: skip
    harness.uploads.write(iter([half]))
    clock.advance(timedelta(seconds=31))
    wait_for(lambda: harness.iterations(task.task_id)[0].assigned == 0, 30, "the upload to time out")
    with pytest.raises(grpc.RpcError) as info:
        upload(harness.uploads, instruction, data)  # the device resumes too late
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    engine = create_engine(database_url)
    with engine.connect() as conn:
        assert conn.execute(select(UploadRow.status)).scalar_one() == "ABANDONED"
    engine.dispose()


def _half_upload(harness: Harness, assignment: ta.TaskAssignment) -> tuple[ta.UploadInstruction, bytes]:
    """The device reports, then streams the first half of its envelope and stops: the rest never comes."""
    instruction = harness.report(assignment).upload_instruction
    data = sealed(assignment)
    harness.uploads.write(iter([upload_pb2.WriteRequest(
        resource_name=instruction.resource_name, upload_token=instruction.upload_token, write_offset=0,
        data=data[: len(data) // 2], finish_write=False,
        metadata=upload_pb2.UploadMetadata(total_size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest()),
    )]))  # fmt: skip
    return instruction, data


def test_staged_bytes_of_an_abandoned_upload_are_removed_and_awaited_ones_kept(
    clocked: tuple[Harness, FakeClock],
) -> None:
    """A device that stops mid-upload and never comes back leaves half an envelope in the staging directory;
    once its upload deadline has passed the staging sweep removes it. Another device's half upload, still within
    its deadline, is kept through the same sweep, and that device then resumes and its upload counts."""
    harness, clock = clocked
    task = harness.create_task(POP, report_goal=2, max_cohort=3, **DEADLINES)
    staging = harness.suite.server.blobs.staging_dir()
    gone = harness.check_in(POP).task_assignment
    _half_upload(harness, gone)
    clock.advance(timedelta(seconds=20))
    back = harness.check_in(POP).task_assignment
    instruction, data = _half_upload(harness, back)
    assert sorted(p.name for p in staging.iterdir()) == sorted(
        f"upload-{a.assignment_id}" for a in (gone, back)
    )  # fmt: skip
    clock.advance(timedelta(seconds=11))  # past the first device's upload deadline, within the second's
    wait_for(lambda: harness.iterations(task.task_id)[0].assigned == 1, 30, "the first device to time out")
    clock.advance(timedelta(seconds=5))  # a staging sweep after the time-out (the two loops run apart)
    only_back = [f"upload-{back.assignment_id}"]  # the removed file's lock file goes when the sweep lets go
    wait_for(lambda: [p.name for p in staging.iterdir()] == only_back, 30, "the staging sweep")
    upload(harness.uploads, instruction, data)  # resumes from its committed half
    assert harness.iterations(task.task_id)[0].completed_uploads == 1
    assert list(staging.iterdir()) == []


def test_at_the_round_deadline_what_reached_quorum_is_aggregated(clocked: tuple[Harness, FakeClock]) -> None:
    harness, clock = clocked
    task = harness.create_task(POP, report_goal=4, max_cohort=6, min_clients=2, **DEADLINES)
    contribute(harness, POP)
    contribute(harness, POP)
    straggler = harness.check_in(POP).task_assignment
    clock.advance(timedelta(seconds=301))
    wait_for(lambda: harness.iterations(task.task_id)[0].status == tm.ITERATION_STATUS_AGGREGATING, 30, "aggregation")
    assert harness.iterations(task.task_id)[0].completed_uploads == 2
    assert _reason(harness.report(straggler)) == "REJECTION_REASON_RESULT_NOT_NEEDED"


def test_a_population_below_quorum_is_retried_then_failed_with_the_reason(
    clocked: tuple[Harness, FakeClock],
) -> None:
    harness, clock = clocked
    task = harness.create_task(POP, report_goal=3, max_cohort=3, **DEADLINES)
    contribute(harness, POP)  # one of the three needed
    clock.advance(timedelta(seconds=301))
    wait_for(lambda: len(harness.iterations(task.task_id)) == 2, 30, "a second attempt")
    first, second = harness.iterations(task.task_id)
    assert first.status == tm.ITERATION_STATUS_FAILED
    assert second.status == tm.ITERATION_STATUS_OPEN
    clock.advance(timedelta(seconds=301))
    wait_for(lambda: harness.task(task.task_id).status == tm.TASK_STATUS_FAILED, 30, "the task to fail")
    reason = harness.task(task.task_id).status_reason
    assert "reached its deadline" in reason
    assert "fewer than min_clients (3)" in reason


def test_a_task_sets_its_own_failure_threshold(clocked: tuple[Harness, FakeClock]) -> None:
    harness, clock = clocked  # the server allows 2 attempts; this task only 1
    task = harness.create_task(POP, report_goal=3, max_cohort=3, max_round_attempts=1, **DEADLINES)
    clock.advance(timedelta(seconds=301))
    wait_for(lambda: harness.task(task.task_id).status == tm.TASK_STATUS_FAILED, 30, "the task to fail")
    assert len(harness.iterations(task.task_id)) == 1
    assert "failed 1 times" in harness.task(task.task_id).status_reason


def test_orphan_blobs_are_swept_after_their_grace_period(clocked: tuple[Harness, FakeClock]) -> None:
    """A server killed between storing an upload and counting it leaves a blob no row refers to."""
    harness, clock = clocked
    task = harness.create_task(POP, report_goal=2, max_cohort=3, **DEADLINES)  # its checkpoint is referenced
    harness.stop_model_updater()  # its first pass, run late, could sweep this test's blobs first
    server = harness.suite.server
    orphan = server.blobs.put(b"an envelope whose upload was never counted")
    fresh = server.blobs.put(b"an upload being counted right now")
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).timestamp()
    path = harness.suite.settings.server_dir() / "blobs" / "sha256" / orphan[:2] / orphan[2:]
    os.utime(path, (two_hours_ago, two_hours_ago))
    updater = ModelUpdater(server.db, server.blobs, clock, RandomIds(), 2)
    assert updater.sweep_orphans() == 1
    assert not server.blobs.exists(orphan)
    assert server.blobs.exists(fresh)  # inside the grace period: maybe an upload about to be counted
    versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions
    assert server.blobs.exists(versions[0].checkpoint.sha256_hex)


def _aged(harness: Harness, sha: str) -> None:
    """The blob's stored time set two hours back: past the orphan sweep's grace period."""
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).timestamp()
    path = harness.suite.settings.server_dir() / "blobs" / "sha256" / sha[:2] / sha[2:]
    os.utime(path, (two_hours_ago, two_hours_ago))


def test_an_old_orphan_put_again_is_not_swept_while_its_row_commits(clocked: tuple[Harness, FakeClock]) -> None:
    """A crash left an update's blob unreferenced; hours later the same bytes are stored again (a retried job
    whose update is identical) and the row referring to them is about to commit. The put found the blob and wrote
    nothing; before 2026-12-03 it left its old mtime, so a sweep at that moment deleted it, and the row committed
    referred to nothing. Now a put of stored bytes makes them new: the sweep leaves them."""
    harness, clock = clocked
    blobs = harness.suite.server.blobs
    update = b"an aggregated update whose job was retried"
    harness.stop_model_updater()  # its first pass, run late, could sweep this test's blobs first
    orphan = blobs.put(update)
    _aged(harness, orphan)
    assert blobs.put(update) == orphan  # stored again; its row not committed yet
    updater = ModelUpdater(harness.suite.server.db, blobs, clock, RandomIds(), 2)
    assert updater.sweep_orphans() == 0
    assert blobs.get(orphan) == update


class _PutDuringListing:
    """The server's blob store, with a put of the same bytes landing just after the sweep's first listing (another
    process storing them while the sweep reads the references)."""

    def __init__(self, blobs: Any, data: bytes) -> None:
        self._blobs, self._data, self.lists = blobs, data, 0

    def stored_before(self, cutoff: datetime) -> list[str]:
        found: list[str] = self._blobs.stored_before(cutoff)
        self.lists += 1
        if self.lists == 1:
            self._blobs.put(self._data)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._blobs, name)


def test_a_put_while_the_sweep_reads_the_references_is_not_swept(clocked: tuple[Harness, FakeClock]) -> None:
    """The same, with the put landing after the sweep listed the old blobs and before it read the references:
    the sweep lists them again before deleting and leaves what is no longer old."""
    harness, clock = clocked
    blobs = harness.suite.server.blobs
    update = b"an aggregated update stored again mid-sweep"
    harness.stop_model_updater()  # its first pass, run late, could sweep this test's blobs first
    orphan = blobs.put(update)
    other = blobs.put(b"an orphan no one stores again")
    _aged(harness, orphan)
    _aged(harness, other)
    racing = _PutDuringListing(blobs, update)
    updater = ModelUpdater(harness.suite.server.db, racing, clock, RandomIds(), 2)
    assert updater.sweep_orphans() == 1
    assert racing.lists == 2
    assert blobs.get(orphan) == update
    assert not blobs.exists(other)


def test_a_cancel_racing_the_sweepers_new_attempt_leaves_no_round_open(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper fails a round at its deadline and opens its next attempt; an operator cancels the task at that
    moment. The sweeper is held after failing attempt 1, before it reads the task, while the cancel runs. Before
    2026-12-02 the cancel read attempt 1 as the current round (its row locked by the sweeper: it waited), marked the
    task CANCELED, and the sweeper, still seeing the task OPEN, opened attempt 2: a CANCELED task with an OPEN round,
    which devices could be admitted to until its deadline (found by review). Now the cancel takes the latest
    round's lock first, as the sweeper does, and cancels attempt 2."""
    from fedcompute.core.clock import SystemClock
    from fedcompute.server.deadlines import DeadlineSweeper
    from fedcompute.server.tasks import TaskService
    from fedcompute.store import rounds
    from fedcompute.store.database import Database
    from fedcompute.store.tasks import TaskRepository

    settings = suite_settings(tmp_path / "w", database_url, housekeeping_interval_s=3600.0)
    harness = Harness.start(settings, aggregator=False)
    db = Database(database_url)
    try:
        task = harness.create_task(POP, round_deadline_s=1)
        threading.Event().wait(1.5)  # past the round's deadline, with no upload: the sweeper fails it
        sweeper = DeadlineSweeper(db, SystemClock(), RandomIds(), max_round_attempts=5)
        service = TaskService(db, harness.suite.server.blobs, SystemClock(), RandomIds())
        held, go = threading.Event(), threading.Event()

        class Held(TaskRepository):  # the sweeper's read of the task in retry_or_fail_round, after attempt 1 FAILED
            def get(self, task_id: str) -> Any:
                held.set()
                go.wait(10)
                return super().get(task_id)

        monkeypatch.setattr(rounds, "TaskRepository", Held)
        swept = threading.Thread(target=sweeper.run_once)
        swept.start()
        assert held.wait(10)
        canceled: list[str] = []
        cancel = threading.Thread(target=lambda: canceled.append(service.cancel(task.task_id, "operator").status))
        cancel.start()
        threading.Event().wait(1.0)  # the cancel waits on the round's lock (SQLite: on the writer)
        go.set()
        swept.join(timeout=30)
        cancel.join(timeout=30)
        assert canceled == ["CANCELED"]
        statuses = [(i.attempt, tm.IterationStatus.Name(i.status)) for i in harness.iterations(task.task_id)]
        assert statuses == [(1, "ITERATION_STATUS_FAILED"), (2, "ITERATION_STATUS_CANCELED")]
        assert harness.task(task.task_id).status == tm.TASK_STATUS_CANCELED
    finally:
        db.dispose()
        harness.stop()
