"""Uploads over real gRPC: resumable, hashed, token-bound, size-limited, encrypted-only."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedcompute.clients.device import download, upload
from fedcompute.clients.typed import UploadClient
from fedcompute.core.blobs import blob_path
from fedcompute.core.settings import Settings
from fedcompute.rpc.channels import REQUEST_ID, open_channel
from fedcompute.rpc.errors import COMMITTED_SIZE_KEY
from fedcompute.v1 import task_assignment_pb2 as ta
from fedcompute.v1 import task_management_pb2 as tm
from fedcompute.v1 import upload_pb2
from tests.fsyncs import watch_fsyncs
from tests.harness import Harness, sealed, suite_settings, wait_for
from tests.pagecache import kept_in_memory, pages_cached


def _ready(harness: Harness, report_goal: int = 2) -> tuple[str, ta.TaskAssignment, ta.UploadInstruction]:
    task = harness.create_task(report_goal=report_goal, max_cohort=3)
    a = harness.check_in().task_assignment
    return task.task_id, a, harness.report(a).upload_instruction


def _write(
    harness: Harness,
    instruction: ta.UploadInstruction,
    data: bytes,
    offset: int = 0,
    declared: bytes | None = None,
    finish: bool = True,
    token: str | None = None,
    size: int | None = None,
) -> upload_pb2.WriteResponse:
    def requests() -> Iterator[upload_pb2.WriteRequest]:
        yield upload_pb2.WriteRequest(
            resource_name=instruction.resource_name,
            upload_token=instruction.upload_token if token is None else token,
            write_offset=offset,
            data=data,
            finish_write=finish,
            metadata=upload_pb2.UploadMetadata(
                total_size_bytes=size if size is not None else len(declared if declared is not None else data),
                sha256_hex=hashlib.sha256(declared if declared is not None else data).hexdigest(),
            ),
        )

    return harness.uploads.write(requests())


def _status(harness: Harness, instruction: ta.UploadInstruction) -> upload_pb2.QueryWriteStatusResponse:
    return harness.uploads.query_write_status(
        upload_pb2.QueryWriteStatusRequest(
            resource_name=instruction.resource_name, upload_token=instruction.upload_token
        )
    )


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()


def test_resumable_upload_and_idempotent_finish(harness: Harness) -> None:
    task_id, a, instruction = _ready(harness)
    data = sealed(a)
    half = len(data) // 2
    first = _write(harness, instruction, data[:half], declared=data, finish=False)
    assert (first.committed_size, first.complete) == (half, False)
    assert _status(harness, instruction).committed_size == half
    with pytest.raises(grpc.RpcError) as info:  # resuming from the wrong offset
        _write(harness, instruction, data[half + 1 :], offset=half + 1, declared=data)
    assert _code(info) == grpc.StatusCode.FAILED_PRECONDITION
    assert str(half) in (info.value.details() or "")
    trailing: dict[str, object] = {m.key: m.value for m in info.value.trailing_metadata() or ()}
    assert trailing[COMMITTED_SIZE_KEY] == str(half)
    assert str(trailing[REQUEST_ID]).startswith("req_")  # beside the error's own trailer, not replaced by it
    done = _write(harness, instruction, data[half:], offset=half, declared=data)
    assert (done.committed_size, done.complete) == (len(data), True)
    again = _write(harness, instruction, b"", offset=len(data), declared=data)
    assert again.complete
    assert harness.iterations(task_id)[0].completed_uploads == 1


def test_device_upload_helper_resumes_after_partial_write(harness: Harness) -> None:
    _, a, instruction = _ready(harness)
    data = sealed(a)
    _write(harness, instruction, data[:100], declared=data, finish=False)
    assert upload(harness.uploads, instruction, data).complete


def test_device_upload_helper_declares_a_hash_it_is_given(harness: Harness) -> None:
    """A device that hashed its envelope when sealing it passes the hash on; the server still checks it."""
    task_id, a, instruction = _ready(harness)
    data = sealed(a)
    done = upload(harness.uploads, instruction, data, hashlib.sha256(data).hexdigest())
    assert (done.committed_size, done.complete) == (len(data), True)
    assert harness.iterations(task_id)[0].completed_uploads == 1


def test_token_problems_are_permission_denied(harness: Harness) -> None:
    _, a, instruction = _ready(harness)
    b = harness.check_in().task_assignment
    other = harness.report(b).upload_instruction
    data = sealed(a)
    for token in ("", "f" * 64, other.upload_token):
        with pytest.raises(grpc.RpcError) as info:
            _write(harness, instruction, data, token=token)
        assert _code(info) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:
        harness.uploads.query_write_status(
            upload_pb2.QueryWriteStatusRequest(resource_name=instruction.resource_name, upload_token=other.upload_token)
        )
    assert _code(info) == grpc.StatusCode.PERMISSION_DENIED
    assert _status(harness, instruction).committed_size == 0


def test_another_devices_assignment_is_permission_denied(harness: Harness) -> None:
    harness.create_task()
    a = harness.check_in().task_assignment
    instruction = harness.report(a).upload_instruction
    b = harness.check_in().task_assignment
    forged = ta.UploadInstruction()
    forged.CopyFrom(instruction)
    forged.resource_name = f"uploads/{b.assignment_id}"
    with pytest.raises(grpc.RpcError) as info:
        _write(harness, forged, sealed(b))
    assert _code(info) == grpc.StatusCode.PERMISSION_DENIED


def test_size_limits(harness: Harness) -> None:
    _, a, instruction = _ready(harness)
    data = sealed(a)
    with pytest.raises(grpc.RpcError) as info:  # more than declared
        _write(harness, instruction, data + b"extra", declared=data)
    assert _code(info) == grpc.StatusCode.INVALID_ARGUMENT
    assert "more bytes than the declared" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:  # declared over the limit (64 KiB in these tests)
        _write(harness, instruction, data[:10], declared=data, size=10**9, finish=False)
    assert _code(info) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert upload(harness.uploads, instruction, data).complete


def test_sha256_mismatch_is_data_loss_and_the_device_may_retry(harness: Harness) -> None:
    task_id, a, instruction = _ready(harness)
    data = sealed(a)
    corrupted = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(grpc.RpcError) as info:
        _write(harness, instruction, corrupted, declared=data)
    assert _code(info) == grpc.StatusCode.DATA_LOSS
    assert _status(harness, instruction).committed_size == 0
    assert harness.iterations(task_id)[0].completed_uploads == 0
    assert _write(harness, instruction, data).complete


_NOT_PROTOBUF = {
    "cut short": b"\x22\x80\x80\x40abc",  # data (field 4) declared 1 MiB long, 3 bytes there
    "field number 0": b"\x02\x01x",
    "a group not ended": b"\x0b",  # a group ended (b"\x0b\x0c") protobuf skips, as the server does
    "a group ended by another": b"\x0b\x14",
    "resource_name not UTF-8": b"\x0a\x02\xc3\x28",
}


@pytest.mark.parametrize("problem", sorted(_NOT_PROTOBUF))
@pytest.mark.parametrize("where", ["first", "after committed bytes"])
def test_a_write_request_that_is_not_protobuf_is_invalid_argument_and_loses_nothing(
    harness: Harness, problem: str, where: str
) -> None:
    """The server reads each WriteRequest itself (its data a view of the message): a message protobuf cannot read
    gets INVALID_ARGUMENT naming it, whether it opens the stream or follows committed bytes; the bytes committed
    before it stay committed and the device resumes from them to a counted upload."""
    task_id, a, instruction = _ready(harness)
    data = sealed(a)
    half = len(data) // 2
    metadata = upload_pb2.UploadMetadata(total_size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest())
    good = upload_pb2.WriteRequest(
        resource_name=instruction.resource_name, upload_token=instruction.upload_token, write_offset=0,
        data=data[:half], metadata=metadata,
    ).SerializeToString()  # fmt: skip
    raw_write = grpc.insecure_channel(harness.suite.server_address).stream_unary(
        "/fedcompute.v1.UploadService/Write",
        request_serializer=bytes,
        response_deserializer=upload_pb2.WriteResponse.FromString,
    )
    stream = [_NOT_PROTOBUF[problem]] if where == "first" else [good, _NOT_PROTOBUF[problem]]
    with pytest.raises(grpc.RpcError) as info:
        raw_write(iter(stream), timeout=20)
    assert _code(info) == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (info.value.details() or "")
    committed = 0 if where == "first" else half
    assert _status(harness, instruction).committed_size == committed
    done = _write(harness, instruction, data[committed:], offset=committed, declared=data)
    assert (done.committed_size, done.complete) == (len(data), True)
    assert harness.iterations(task_id)[0].completed_uploads == 1


@pytest.mark.parametrize("staged", ["missing", "shortened", "missing, the device's own client"])
def test_a_resume_whose_staged_bytes_are_gone_is_data_loss_and_the_device_starts_over(
    harness: Harness, staged: str
) -> None:
    """The committed half of an upload is no longer in this server's staging directory (written to another
    replica's disk, or lost with this one's; the disk is the operator's): the resume gets DATA_LOSS at once, before
    the device sends anything more, and the upload is back at offset 0; the device's own client then sends it all
    again and it counts once, with exactly its bytes."""
    task_id, a, instruction = _ready(harness)
    data = sealed(a)
    half = len(data) // 2
    _write(harness, instruction, data[:half], declared=data, finish=False)
    path = harness.suite.server.blobs.staging_dir() / f"upload-{a.assignment_id}"
    if staged == "shortened":
        path.write_bytes(data[: half // 2])
    else:
        path.unlink()
    if staged != "missing, the device's own client":  # which resumes at the trailer's offset, then starts over
        with pytest.raises(grpc.RpcError) as info:
            _write(harness, instruction, data[half:], offset=half, declared=data)
        assert _code(info) == grpc.StatusCode.DATA_LOSS
        assert "does not hold the upload's committed bytes" in (info.value.details() or "")
        assert _status(harness, instruction).committed_size == 0
        assert not path.exists()
    assert upload(harness.uploads, instruction, data).complete
    assert harness.iterations(task_id)[0].completed_uploads == 1
    assert harness.suite.server.blobs.get(hashlib.sha256(data).hexdigest()) == data


@pytest.mark.skipif(sys.platform != "linux", reason="posix_fadvise and mincore are Linux's")
def test_an_uploaded_envelope_leaves_the_page_cache_once_it_is_on_disk(database_url: str, tmp_path: Path) -> None:
    """An upload is written once here and read once, later, by the aggregator: it is written past the page cache
    (core/files.py UncachedAppender; elsewhere its pages dropped once fsynced), where its pages would push out what
    is read again and make the next upload's writes find new pages. The header, read back to check the envelope's
    binding, may stay."""
    if kept_in_memory(tmp_path):
        pytest.skip("the test directory is on tmpfs: its files live in the page cache")
    harness = Harness.start(suite_settings(tmp_path / "w", database_url, max_upload_bytes=4 << 20), aggregator=False)
    try:
        task_id, a, instruction = _ready(harness)
        data = sealed(a, os.urandom(2 << 20))
        assert upload(harness.uploads, instruction, data).complete
        sha = hashlib.sha256(data).hexdigest()
        cached, pages = pages_cached(blob_path(harness.suite.settings.blob_dir(), sha))
        assert pages > 500
        assert cached < pages // 10, f"{cached} of the blob's {pages} pages are still cached"
        assert harness.suite.server.blobs.get(sha) == data  # dropped from the cache, not from the disk
        assert harness.iterations(task_id)[0].completed_uploads == 1
    finally:
        harness.stop()


@pytest.mark.parametrize("kind", ["plaintext", "garbage-proto", "other-task", "other-round"])
def test_plaintext_or_misbound_envelopes_are_invalid_argument(harness: Harness, kind: str) -> None:
    task_id, a, instruction = _ready(harness)
    if kind == "plaintext":
        from tests.harness import zero_update

        data = zero_update()
    elif kind == "garbage-proto":
        data = b"\x0a\x05hello\xff\xff"
    elif kind == "other-task":
        data = sealed(a, task_id="task_someone_else")
    else:
        data = sealed(a, round=a.round + 1)
    with pytest.raises(grpc.RpcError) as info:
        _write(harness, instruction, data)
    assert _code(info) == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.iterations(task_id)[0].completed_uploads == 0
    assert _write(harness, instruction, sealed(a)).complete  # nothing lost: the real upload still works


def test_stragglers_racing_the_round_close_get_clear_answers_and_leave_nothing_behind(
    harness: Harness, database_url: str
) -> None:
    """Twelve devices finish their uploads at once against a report goal of four (Postgres: uploads and the
    collector lock the round first, so no deadlock): each gets OK or FAILED_PRECONDITION, never UNKNOWN or
    INTERNAL; exactly four are counted; no upload is left IN_PROGRESS and no uncounted envelope is stored."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import create_engine, select

    from fedcompute.store.models import UploadRow

    task = harness.create_task(report_goal=4, max_cohort=12)
    ready = []
    for _ in range(12):
        a = harness.check_in().task_assignment
        ready.append((harness.report(a).upload_instruction, sealed(a)))

    def finish(item: tuple[ta.UploadInstruction, bytes]) -> str:
        try:
            upload(harness.uploads, *item)
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK"

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(finish, ready))
    assert set(codes) <= {"OK", "FAILED_PRECONDITION"}, codes
    assert harness.iterations(task.task_id)[0].completed_uploads == 4
    engine = create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(UploadRow.status, UploadRow.blob_sha256)).all()
    engine.dispose()
    assert [r.status for r in rows].count("COMPLETE") == 4
    assert "IN_PROGRESS" not in [r.status for r in rows]
    counted = {r.blob_sha256 for r in rows if r.blob_sha256}
    stored = {p.parent.name + p.name for p in (harness.suite.settings.blob_dir() / "sha256").rglob("*") if p.is_file()}
    envelopes = {sha for sha in stored if sha not in counted}
    from fedcompute.keys.envelope import parse_envelope

    for sha in envelopes:  # what remains besides counted envelopes must be model checkpoints, not uploads
        path = blob_path(harness.suite.settings.blob_dir(), sha)
        with pytest.raises(Exception):  # noqa: B017, PT011
            parse_envelope(path.read_bytes())


class _DroppedConnection(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class _FlakyUploads:
    """The real upload client, but the network drops the first ``drops`` Write streams half-way through."""

    def __init__(self, real: Any, drops: int) -> None:
        self._real = real
        self.drops = drops
        self.writes = 0

    def query_write_status(self, request: upload_pb2.QueryWriteStatusRequest) -> upload_pb2.QueryWriteStatusResponse:
        return self._real.query_write_status(request)  # type: ignore[no-any-return]

    def write_encoded(self, requests: Iterator[bytes]) -> upload_pb2.WriteResponse:
        self.writes += 1
        if self.writes > self.drops:
            return self._real.write_encoded(requests)  # type: ignore[no-any-return]
        half = upload_pb2.WriteRequest.FromString(next(iter(requests)))
        half.data = half.data[: len(half.data) // 2]
        half.finish_write = False
        self._real.write(iter([half]))  # half the bytes arrive, then the connection drops
        raise _DroppedConnection()


def test_an_interrupted_upload_is_resumed_with_backoff_before_its_deadline(harness: Harness) -> None:
    task_id, a, instruction = _ready(harness, report_goal=1)
    assert instruction.upload_deadline_unix > time.time()
    flaky = _FlakyUploads(harness.uploads, drops=2)
    done = upload(flaky, instruction, sealed(a))  # type: ignore[arg-type]
    assert done.complete
    assert flaky.writes == 3
    assert harness.iterations(task_id)[0].completed_uploads == 1


def test_an_upload_stops_retrying_at_its_deadline(harness: Harness) -> None:
    _, a, instruction = _ready(harness)
    instruction.upload_deadline_unix = int(time.time()) - 1  # already past: one try, then the error
    flaky = _FlakyUploads(harness.uploads, drops=100)
    with pytest.raises(grpc.RpcError) as info:
        upload(flaky, instruction, sealed(a))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert flaky.writes == 1


def test_an_upload_begun_on_one_replica_resumes_on_another(harness: Harness) -> None:
    """Two server replicas on one database and one data directory: resumption does not depend on which
    replica a device reaches."""
    from fedcompute.core.clock import RandomIds, SystemClock
    from fedcompute.core.secrets import token_secret, worker_token
    from fedcompute.rpc.channels import open_channel
    from fedcompute.server.app import build_server

    settings = harness.suite.settings.model_copy(update={"server_port": 0})
    other = build_server(settings, SystemClock(), RandomIds(), worker_token(settings), token_secret(settings))
    try:
        task_id, a, instruction = _ready(harness, report_goal=1)
        data = sealed(a)
        half = _FlakyUploads(harness.uploads, drops=1)  # replica A gets half, then the connection drops
        with pytest.raises(grpc.RpcError):
            half.write_encoded(
                iter([upload_pb2.WriteRequest(
                    resource_name=instruction.resource_name, upload_token=instruction.upload_token,
                    write_offset=0, data=data, finish_write=True,
                    metadata=upload_pb2.UploadMetadata(
                        total_size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest()
                    ),
                ).SerializeToString()])
            )  # fmt: skip
        replica_b = UploadClient(open_channel(f"127.0.0.1:{other.grpc.port}"), 20.0)
        status = replica_b.query_write_status(
            upload_pb2.QueryWriteStatusRequest(
                resource_name=instruction.resource_name, upload_token=instruction.upload_token
            )
        )
        assert 0 < status.committed_size < len(data)
        assert upload(replica_b, instruction, data).complete
        assert harness.iterations(task_id)[0].completed_uploads == 1
    finally:
        other.stop()


def _uploads_rows(database_url: str, assignment_id: str) -> list[tuple[str, int]]:
    from sqlalchemy import create_engine, select

    from fedcompute.store.models import UploadRow

    engine = create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(UploadRow.status, UploadRow.committed_size).where(UploadRow.assignment_id == assignment_id)
        ).all()
    engine.dispose()
    return [(r.status, r.committed_size) for r in rows]


@pytest.mark.parametrize("ending", ["finished", "broken"])
def test_a_stream_writes_its_row_only_when_it_ends_and_none_once_its_round_closed(
    harness: Harness, database_url: str, ending: str
) -> None:
    """A stream's start only reads: while its bytes arrive the store holds no upload row (QueryWriteStatus says 0).
    The operator cancels the task mid-stream; when the stream then finishes (or breaks off), the device gets
    FAILED_PRECONDITION and no upload row is written for the closed round, nothing counted. Beside it, a stream
    broken off in an open round leaves the row with the bytes it committed, to resume from."""
    from fedcompute.v1 import task_management_pb2 as tm

    task = harness.create_task(report_goal=3, max_cohort=3)
    a = harness.check_in().task_assignment
    instruction = harness.report(a).upload_instruction
    data = sealed(a)
    half = len(data) // 2
    sent, go_on = threading.Event(), threading.Event()

    def requests() -> Iterator[upload_pb2.WriteRequest]:
        yield upload_pb2.WriteRequest(
            resource_name=instruction.resource_name, upload_token=instruction.upload_token, write_offset=0,
            data=data[:half], metadata=upload_pb2.UploadMetadata(
                total_size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest()),
        )  # fmt: skip
        sent.set()
        go_on.wait(30)
        if ending == "finished":
            yield upload_pb2.WriteRequest(write_offset=half, data=data[half:], finish_write=True)

    outcome: list[object] = []

    def stream() -> None:
        try:
            outcome.append(harness.uploads.write(requests()))
        except grpc.RpcError as exc:
            outcome.append(exc.code())

    writer = threading.Thread(target=stream)
    writer.start()
    assert sent.wait(30)
    time.sleep(0.3)  # the server has the first chunk
    assert _uploads_rows(database_url, a.assignment_id) == []
    assert _status(harness, instruction).committed_size == 0
    harness.operators.cancel_task(tm.CancelTaskRequest(task_id=task.task_id))
    go_on.set()
    writer.join(30)
    assert outcome == [grpc.StatusCode.FAILED_PRECONDITION]
    assert _uploads_rows(database_url, a.assignment_id) == []
    assert harness.iterations(task.task_id)[0].completed_uploads == 0

    other = harness.create_task(population="pop2", report_goal=2, max_cohort=2)
    b = harness.check_in(population="pop2").task_assignment
    second = harness.report(b).upload_instruction
    data = sealed(b)
    assert _write(harness, second, data[:half], declared=data, finish=False).committed_size == half
    assert _uploads_rows(database_url, b.assignment_id) == [("IN_PROGRESS", half)]
    assert _write(harness, second, data[half:], offset=half, declared=data).complete
    assert _uploads_rows(database_url, b.assignment_id) == [("COMPLETE", len(data))]
    assert harness.iterations(other.task_id)[0].completed_uploads == 1


def _locked(path: Path) -> bool:
    """Whether an exclusive flock is held on ``path``, read from /proc/locks (probing with a lock of our own
    could take it first and turn the holder away)."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return False
    lines = Path("/proc/locks").read_text().splitlines()
    return any(f.split()[1:3] == ["FLOCK", "ADVISORY"] and f.split()[5].endswith(f":{inode}") for f in lines)


def _held_open(
    uploads: UploadClient,
    instruction: ta.UploadInstruction,
    data: bytes,
    metadata: upload_pb2.UploadMetadata,
    go_on: threading.Event,
    wait_s: float,
) -> tuple[threading.Thread, list[upload_pb2.WriteResponse | Exception]]:
    """A stream of the upload started on a thread of its own: it sends the first half, then holds the stream open
    until ``go_on`` (at most ``wait_s``) and sends the rest with finish_write; its answer, or error, lands in the
    list returned."""
    half = len(data) // 2

    def stream() -> Iterator[upload_pb2.WriteRequest]:
        yield upload_pb2.WriteRequest(
            resource_name=instruction.resource_name, upload_token=instruction.upload_token,
            write_offset=0, data=data[:half], metadata=metadata,
        )  # fmt: skip
        go_on.wait(wait_s)
        yield upload_pb2.WriteRequest(write_offset=half, data=data[half:], finish_write=True)

    answers: list[upload_pb2.WriteResponse | Exception] = []

    def send() -> None:
        try:
            answers.append(uploads.write(stream()))
        except Exception as exc:  # reported by the caller's assertions
            answers.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    return thread, answers


def test_a_second_stream_of_an_upload_on_the_same_server_is_turned_away_not_queued(harness: Harness) -> None:
    """The same server queued a second stream of an upload behind the first, on a lock stripe shared with other
    uploads, holding a gRPC thread for as long as the first stream idled (a device sending nothing, or one whose
    broken connection the server had not noticed): sixteen such streams held every thread (found by a review,
    2026-12-02). Now it gets ABORTED at once, as on another replica, and writes nothing; the first stream, idle
    meanwhile, then finishes with the declared bytes."""
    from fedcompute.store.blobstores import open_blob_store

    blobs = open_blob_store(harness.suite.settings)
    go_on = threading.Event()
    task_id, a, instruction = _ready(harness, report_goal=1)
    data = sealed(a)
    metadata = upload_pb2.UploadMetadata(total_size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest())
    # idle longer than the second call's deadline: a queued second stream would time out
    on_first, answers = _held_open(harness.uploads, instruction, data, metadata, go_on, 60.0)
    try:
        lock = blobs.staging_dir() / f"upload-{a.assignment_id}.lock"
        wait_for(lambda: _locked(lock), 20, "the first stream to hold the upload")
        forged = bytes(len(data))
        with pytest.raises(grpc.RpcError) as info:
            harness.uploads.write(iter([upload_pb2.WriteRequest(
                resource_name=instruction.resource_name, upload_token=instruction.upload_token,
                write_offset=0, data=forged, finish_write=True,
                metadata=upload_pb2.UploadMetadata(total_size_bytes=len(forged),
                                                   sha256_hex=hashlib.sha256(forged).hexdigest()),
            )]))  # fmt: skip
        assert _code(info) == grpc.StatusCode.ABORTED
        assert "another stream is writing this upload" in (info.value.details() or "")
    finally:
        go_on.set()
        on_first.join(30)
    assert len(answers) == 1
    assert isinstance(answers[0], upload_pb2.WriteResponse)
    assert answers[0].complete
    assert harness.iterations(task_id)[0].completed_uploads == 1
    assert blobs.get(metadata.sha256_hex) == data


def test_two_streams_of_one_upload_on_two_replicas_never_write_at_once(harness: Harness) -> None:
    """A device (or one racing itself) streams one upload to replica A and, while that stream is still open, to
    replica B, which shares A's data directory. B's stream gets ABORTED and writes nothing: two writers would
    interleave their bytes in the one staging file while each stream's hash covered only its own, and the stored
    envelope would fail every verified read, losing the round's aggregation. A's stream then finishes with the
    declared bytes, the blob stored under its hash holds exactly them, and the device's own client, turned away
    by B while A's stream was open, resumes and reports the upload complete."""
    from fedcompute.core.clock import RandomIds, SystemClock
    from fedcompute.core.secrets import token_secret, worker_token
    from fedcompute.rpc.channels import open_channel
    from fedcompute.server.app import build_server
    from fedcompute.store.blobstores import open_blob_store

    settings = harness.suite.settings.model_copy(update={"server_port": 0})
    other = build_server(settings, SystemClock(), RandomIds(), worker_token(settings), token_secret(settings))
    blobs = open_blob_store(settings)
    go_on = threading.Event()
    try:
        task_id, a, instruction = _ready(harness, report_goal=1)
        data = sealed(a)
        metadata = upload_pb2.UploadMetadata(total_size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest())
        on_a, answers = _held_open(harness.uploads, instruction, data, metadata, go_on, 30.0)
        staged = blobs.staging_dir() / f"upload-{a.assignment_id}"
        wait_for(lambda: _locked(staged.with_name(staged.name + ".lock")), 20, "A's stream to hold the upload")

        replica_b = UploadClient(open_channel(f"127.0.0.1:{other.grpc.port}"), 20.0)
        forged = bytes(len(data))  # other bytes under their own declared hash, from offset 0
        for body, declared in ((data, metadata), (forged, None)):
            with pytest.raises(grpc.RpcError) as info:
                replica_b.write(iter([upload_pb2.WriteRequest(
                    resource_name=instruction.resource_name, upload_token=instruction.upload_token,
                    write_offset=0, data=body, finish_write=True,
                    metadata=declared or upload_pb2.UploadMetadata(
                        total_size_bytes=len(body), sha256_hex=hashlib.sha256(body).hexdigest()),
                )]))  # fmt: skip
            assert _code(info) == grpc.StatusCode.ABORTED
            assert "another stream is writing this upload" in (info.value.details() or "")

        resumed: list[upload_pb2.WriteResponse] = []
        device = threading.Thread(target=lambda: resumed.append(upload(replica_b, instruction, data)))
        device.start()  # turned away (ABORTED) while A's stream is open, it backs off and tries again
        time.sleep(0.3)
        go_on.set()
        on_a.join(30)
        device.join(30)
        assert len(answers) == 1
        assert isinstance(answers[0], upload_pb2.WriteResponse)
        assert answers[0].complete
        assert len(resumed) == 1
        assert resumed[0].complete
        assert resumed[0].committed_size == len(data)
        assert harness.iterations(task_id)[0].completed_uploads == 1
        assert blobs.get(metadata.sha256_hex) == data
        assert not list(staged.parent.glob(f"upload-{a.assignment_id}*"))  # no staging or lock file left
    finally:
        go_on.set()
        other.stop()


def test_a_staged_file_is_named_durably_before_its_progress_is_recorded(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream from offset 0 that stops short creates the staging file and records its committed size. The
    file's bytes are fsynced, and its directory is too, before the row records them: after a power cut the file's
    name is still there for the resume the row promises (DATA_LOSS, a full resend, otherwise). Before 2026-12-02
    only the bytes were fsynced. A resume from the middle creates nothing and fsyncs no directory."""
    from fedcompute.server import uploads

    _, a, instruction = _ready(harness)
    data = sealed(a)
    upload_id = instruction.resource_name.removeprefix("uploads/")
    synced: list[tuple[Path, list[tuple[str, int]]]] = []
    from fedcompute.core.files import fsync_directory as real

    def fsync_directory(directory: Path) -> None:
        real(directory)
        synced.append((directory, _uploads_rows(harness.suite.settings.database_url, upload_id)))

    monkeypatch.setattr(uploads, "fsync_directory", fsync_directory)
    _write(harness, instruction, data[:100], declared=data, finish=False)
    staging = harness.suite.server.blobs.staging_dir()
    assert synced == [(staging, [])]  # before the row that records the 100 bytes was written
    assert _uploads_rows(harness.suite.settings.database_url, upload_id) == [("IN_PROGRESS", 100)]
    _write(harness, instruction, data[100:200], offset=100, declared=data, finish=False)
    assert len(synced) == 1


def test_a_stored_upload_was_fsynced_by_the_stream_that_wrote_it_and_is_not_fsynced_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stream fsyncs the staged file's bytes once, as it ends (the first one's 100, the second one's rest);
    the blob store then renames the file in and fsyncs the directory that names it, without fsyncing the file a
    third time: that fsync found nothing to write and still flushed the disk's cache (ext4), one flush of the ~5
    an upload made. Observed through the real fsync calls, by the path each descriptor names."""
    _, a, instruction = _ready(harness)
    data = sealed(a)
    upload_id = instruction.resource_name.removeprefix("uploads/")
    synced = watch_fsyncs(monkeypatch)
    _write(harness, instruction, data[:100], declared=data, finish=False)
    assert _write(harness, instruction, data[100:], offset=100, declared=data).complete
    staged = str(harness.suite.server.blobs.staging_dir() / f"upload-{upload_id}")
    sha = hashlib.sha256(data).hexdigest()
    named_in = str(blob_path(harness.suite.settings.blob_dir(), sha).parent)
    assert [p for p in synced if p == staged] == [staged, staged]
    assert named_in in synced[synced.index(staged) :]
    assert harness.suite.server.blobs.get(sha) == data


def _every_thread_a_stream(settings: Settings) -> Settings:
    """The stream cap off (as many device streams as threads, which the settings refuse: ``model_copy`` does not
    validate), so that quiet streams can hold every thread and the idle limit alone must free them."""
    return settings.model_copy(update={"device_streams_max": settings.worker_threads})


def test_upload_streams_left_quiet_are_cancelled_and_free_the_servers_threads(
    database_url: str, tmp_path: Path
) -> None:
    """A server of four gRPC threads; four Write streams are opened and go quiet: one after committing 100 bytes,
    three before their first message (no token needed to hold a thread that long). Each is cancelled once it has
    sent nothing for ``stream_idle_s`` (0.5 s), and counted; a check-in made meanwhile is answered, and the first
    upload resumes from its 100 committed bytes. Before 2026-12-02 such streams held their threads for as long as
    their clients' deadlines allowed: four of them stopped every call to this server (sixteen, the default)."""
    settings = _every_thread_a_stream(
        suite_settings(tmp_path / "w", database_url, max_upload_bytes=64 * 1024, stream_idle_s=0.5, worker_threads=4)
    )
    harness = Harness.start(settings, aggregator=False)
    quiet = threading.Event()
    try:
        task_id, a, instruction = _ready(harness, report_goal=1)
        data = sealed(a)
        first = upload_pb2.WriteRequest(
            resource_name=instruction.resource_name, upload_token=instruction.upload_token, data=data[:100],
            metadata=upload_pb2.UploadMetadata(total_size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest()),
        )  # fmt: skip

        def stream(sent: list[upload_pb2.WriteRequest]) -> Iterator[upload_pb2.WriteRequest]:
            yield from sent
            quiet.wait()  # then nothing more, until the test ends

        codes: list[grpc.StatusCode] = []

        def write(sent: list[upload_pb2.WriteRequest]) -> None:
            try:
                harness.uploads.write(stream(sent))
            except grpc.RpcError as exc:
                codes.append(exc.code())

        threads = [threading.Thread(target=write, args=(sent,)) for sent in ([first], [], [], [])]
        for thread in threads:
            thread.start()
        threading.Event().wait(0.2)  # every thread of the server is held by a quiet stream
        harness.create_task("other", report_goal=2, max_cohort=3)
        assert harness.check_in("other").HasField("task_assignment")  # answered once the streams were cancelled
        for thread in threads:
            thread.join(timeout=10)
        assert codes == [grpc.StatusCode.CANCELLED] * 4
        # kept for the device's resume (recorded as the handler ends, a moment after the device was told)
        wait_for(lambda: _status(harness, instruction).committed_size == 100, 10, "the committed bytes")
        assert upload(harness.uploads, instruction, data).complete
        assert harness.iterations(task_id)[0].completed_uploads == 1
        registry = harness.suite.server.registry
        assert registry.get_sample_value("fedcompute_server_idle_streams_cancelled_total", {"method": "Write"}) == 4
        handled = {"service": "UploadService", "method": "Write", "code": "CANCELLED"}  # each handler's last step
        wait_for(lambda: registry.get_sample_value("fedcompute_server_rpcs_handled_total", handled) == 4, 10)
    finally:
        quiet.set()
        harness.stop()


def _stalled_read(address: str, resource_name: str) -> tuple[socket.socket, Any, int]:
    """A device of its own HTTP/2 (the h2 library, no gRPC) that starts a Read and gives the server no room to send
    it anything: its streams' initial flow-control window is 0 and it never opens it. Returns its socket, its
    connection state and the stream's id."""
    import h2.config
    import h2.connection
    import h2.settings

    from fedcompute.v1 import resource_pb2

    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    stream_id = conn.get_next_available_stream_id()
    headers = [
        (":method", "POST"), (":scheme", "http"), (":authority", address),
        (":path", "/fedcompute.v1.ResourceService/Read"), ("content-type", "application/grpc"), ("te", "trailers"),
    ]  # fmt: skip
    conn.send_headers(stream_id, headers)
    message = resource_pb2.ReadRequest(resource_name=resource_name).SerializeToString()
    conn.send_data(stream_id, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
    sock.sendall(conn.data_to_send())
    return sock, conn, stream_id


def _ended_by_server(sock: socket.socket, conn: Any, stream_id: int) -> grpc.StatusCode:
    """Read the connection (still giving no room) until the server ends the stream: the gRPC status of its
    trailers."""
    import h2.events

    while True:
        data = sock.recv(65536)
        assert data, "the server closed the connection without ending the stream"
        for event in conn.receive_data(data):
            assert not isinstance(event, h2.events.DataReceived), "the server sent data past a window of 0"
            if isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream_id:
                status = dict((bytes(k), bytes(v)) for k, v in event.headers)[b"grpc-status"]
                return next(code for code in grpc.StatusCode if code.value[0] == int(status))
        sock.sendall(conn.data_to_send())  # settings and pings acknowledged; no window update


def test_downloads_their_devices_stopped_reading_are_cancelled_and_free_the_servers_threads(
    database_url: str, tmp_path: Path
) -> None:
    """A server of four gRPC threads; four devices start downloading a 4.5 MB model and give the server no room to
    send it (an HTTP/2 window of 0, never opened: a device that stopped reading, played out). gRPC takes the first
    chunk into its buffers; each handler then waits in gRPC's send of the next. Each is cancelled once it has
    waited ``stream_idle_s`` (0.5 s): the stream ends CANCELLED and is counted, and a check-in made meanwhile is
    answered. Before 2026-12-02 a download held its thread for as long as the
    device's deadline allowed (none at all, if it set none): four of them stopped every call to this server."""
    settings = _every_thread_a_stream(suite_settings(tmp_path / "w", database_url, stream_idle_s=0.5, worker_threads=4))
    harness = Harness.start(settings, aggregator=False)
    stalled = []
    try:
        task = harness.create_task(model_architecture="bench-1m", report_goal=2, max_cohort=3)
        request = tm.ListModelVersionsRequest(task_id=task.task_id)
        model = harness.operators.list_model_versions(request).versions[0].checkpoint  # 4.5 MB: five chunks
        stalled = [_stalled_read(harness.suite.server_address, model.resource_name) for _ in range(4)]
        assert harness.check_in().HasField("task_assignment")  # answered once the downloads were cancelled
        for sock, conn, stream_id in stalled:
            assert _ended_by_server(sock, conn, stream_id) == grpc.StatusCode.CANCELLED
        registry = harness.suite.server.registry
        read = {"method": "Read"}
        wait_for(lambda: registry.get_sample_value("fedcompute_server_idle_streams_cancelled_total", read) == 4, 10)
    finally:
        for sock, _, _ in stalled:
            sock.close()
        harness.stop()


def test_device_streams_past_the_servers_limit_are_refused_at_once_and_unary_calls_keep_their_threads(
    database_url: str, tmp_path: Path
) -> None:
    """A server of four gRPC threads serves at most two device streams at once (the default: the threads less a
    quarter, at least two kept). Two quiet uploads (no first message, a long idle limit) take both stream slots;
    a third stream, a download, is refused at once (RESOURCE_EXHAUSTED with a retry pushback, its thread freed),
    and check-ins are answered meanwhile. Before 2026-12-02 streams queued for threads like any call, so a client
    reopening quiet streams faster than the idle limit ended them delayed every call on the server."""
    from fedcompute.rpc.errors import RETRY_PUSHBACK_KEY
    from fedcompute.v1 import resource_pb2, resource_pb2_grpc

    settings = suite_settings(tmp_path / "w", database_url, stream_idle_s=30.0, worker_threads=4)
    assert settings.resolved_device_streams_max() == 2
    harness = Harness.start(settings, aggregator=False)
    quiet = threading.Event()

    def stream() -> Iterator[upload_pb2.WriteRequest]:
        quiet.wait()
        yield from ()

    codes: list[grpc.StatusCode] = []

    def write() -> None:
        try:
            harness.uploads.write(stream())
        except grpc.RpcError as exc:
            codes.append(exc.code())

    held = [threading.Thread(target=write) for _ in range(2)]
    try:
        task = harness.create_task(report_goal=2, max_cohort=3)
        for thread in held:
            thread.start()
        wait_for(lambda: harness.suite.server.registry.get_sample_value(
            "fedcompute_server_rpcs_in_flight", {"service": "UploadService", "method": "Write"}) == 2, 10)  # fmt: skip
        plan = harness.operators.get_task(tm.GetTaskRequest(task_id=task.task_id)).task.plan
        reads = resource_pb2_grpc.ResourceServiceStub(open_channel(harness.suite.server_address))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(reads.Read(resource_pb2.ReadRequest(resource_name=plan.resource_name), timeout=10))
        assert _code(info) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "most device streams at once (2)" in (info.value.details() or "")
        trailing: dict[str, object] = {m.key: m.value for m in info.value.trailing_metadata() or ()}
        assert 500 <= int(str(trailing[RETRY_PUSHBACK_KEY])) <= 2000
        assert time.monotonic() - started < 5  # refused at once, not queued behind the quiet streams
        for _ in range(3):
            assert harness.check_in().HasField("task_assignment")
        assert not codes  # the two quiet streams are still open
        got: list[bytes] = []
        waiting = threading.Thread(target=lambda: got.append(download(harness.resources, plan)))
        waiting.start()  # refused while the slots are taken: the device asks again after the pushback
        threading.Event().wait(0.3)
        quiet.set()  # the quiet streams end: a slot frees
        waiting.join(timeout=30)
        assert len(got[0]) == plan.size_bytes
    finally:
        quiet.set()
        for thread in held:
            thread.join(timeout=10)
        harness.stop()
