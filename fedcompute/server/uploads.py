"""Resumable, hashed uploads of encrypted updates (google.bytestream semantics).

Bytes go to a staging file that is fsynced before the committed size advances in the store, so a device can
resume from ``QueryWriteStatus`` after any failure. The bytes are hashed as they arrive; on finish the hash is
checked against the declared sha256, the envelope's header (not its ciphertext) checked to be bound to this
assignment, the file moved into the blob store, and counted. A stream's start only reads (no write lock); the
upload's row is written once, when the stream ends: with the bytes it committed, or complete and counted.
An upload's staging file has one writer at a time across every process that shares the staging directory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.context import ContributionContext
from fedcompute.core.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    OffsetMismatch,
    PermissionDenied,
    ResourceExhausted,
)
from fedcompute.core.files import UncachedAppender, fsync_directory
from fedcompute.core.records import UploadRecord
from fedcompute.core.transitions import AssignmentStatus, UploadStatus
from fedcompute.keys.envelope import check_envelope, read_envelope_header
from fedcompute.rpc.auth import TokenSigner
from fedcompute.server.assignment import UPLOAD
from fedcompute.server.staging import sole_writer
from fedcompute.store.assignments import AssignmentRepository, UploadRepository
from fedcompute.store.blobstores import StagedBlobStore
from fedcompute.store.database import Database, Session
from fedcompute.store.groupcommit import GroupCommit, Work, each_in_savepoint
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.rounds import close_round
from fedcompute.store.tasks import TaskRepository

log = structlog.get_logger("fedcompute.upload")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^uploads/(asg_[A-Za-z0-9_-]+)$")


@dataclass(frozen=True)
class WriteChunk:
    resource_name: str
    write_offset: int
    finish_write: bool
    data: bytes | memoryview  # a view of the message received (server/api_devices.py write_chunk)
    upload_token: str
    total_size: int = 0
    sha256_hex: str = ""


@dataclass(frozen=True)
class WriteStatus:
    committed_size: int
    complete: bool


class _RoundClosed(Exception):
    pass


@dataclass(frozen=True)
class _Started:
    """An upload as its stream began: its row as stored, or as it is to be written when the stream ends (the start
    writes nothing). ``row``: "stored" (the row is ``upload``), "new" (no row yet), "restart" (a row for an earlier
    declared object, nothing committed: it takes this stream's size and hash)."""

    upload: UploadRecord
    iteration_id: str
    row: str


@dataclass(frozen=True)
class _RoundFacts:
    """What an upload's envelope must be bound to and when its round is full: fixed when the round opens."""

    population_name: str
    task_id: str
    round: int
    aggregation_id: str
    model_version: int
    plan_sha256: str
    policy_sha256: str
    report_goal: int


def _hash_prefix(handle: BinaryIO, size: int, digest: Any) -> None:
    """Feed the first ``size`` bytes of ``handle`` (which holds at least that many) into ``digest``."""
    handle.seek(0)
    left = size
    while left > 0:
        block = handle.read(min(left, 1 << 20))
        digest.update(block)
        left -= len(block)


class UploadService:
    def __init__(
        self,
        db: Database,
        blobs: StagedBlobStore,
        clock: Clock,
        ids: IdGenerator,
        signer: TokenSigner,
        max_bytes: int,
        on_round_closed: Callable[[], object] | None = None,
    ) -> None:
        self._on_round_closed = on_round_closed or (lambda: None)  # a count closed its round: a job is queued
        self._db = db
        self._blobs = blobs
        self._staging = blobs.staging_dir()
        self._clock = clock
        self._ids = ids
        self._signer = signer
        self._max_bytes = max_bytes
        self._facts: dict[str, _RoundFacts] = {}  # iteration id -> its facts (immutable once open; bounded)
        self._counts: GroupCommit[tuple[str, Work[bool]], bool] = GroupCommit(partial(each_in_savepoint, db))

    def _authorize(self, resource_name: str, token: str) -> str:
        match = _NAME.match(resource_name)
        if not match:
            raise InvalidArgument("resource_name", "must be 'uploads/{assignment_id}' from the upload instruction")
        if not token:
            raise PermissionDenied("upload_token is missing; use the token from the upload instruction")
        if not self._signer.verify(UPLOAD, resource_name, token):
            raise PermissionDenied("upload_token is not valid for this resource")
        return match.group(1)

    def query(self, resource_name: str, token: str) -> WriteStatus:
        assignment_id = self._authorize(resource_name, token)
        with self._db.reading() as s:
            upload = UploadRepository(s).get(assignment_id)
        if upload is None:
            return WriteStatus(0, False)
        return WriteStatus(upload.committed_size, upload.status == UploadStatus.COMPLETE)

    def write(self, chunks: Iterator[WriteChunk]) -> WriteStatus:
        first = next(chunks, None)
        if first is None:
            raise InvalidArgument("requests", "the write stream was empty")
        upload_id = self._authorize(first.resource_name, first.upload_token)
        # one writer per upload in every process sharing the staging directory, this one included: a second stream
        # is turned away at once (ABORTED), never queued on a thread for as long as the first one idles
        with sole_writer(self._staging, upload_id):
            started = self._begin(upload_id, first)
            upload = started.upload
            if upload.status == UploadStatus.COMPLETE:
                return WriteStatus(upload.total_size, True)
            if first.write_offset != upload.committed_size:
                raise OffsetMismatch(upload.committed_size, first.write_offset)
            return self._receive(started, chain([first], chunks))

    def _begin(self, upload_id: str, first: WriteChunk) -> _Started:
        """Whether this stream may go on, and from where: a read, no write lock. Nothing is written until the
        stream ends (``_store_progress``, ``_count``), each time checking again, under the locks, that the
        assignment still wants its upload: a round closed meanwhile gets no upload row."""
        with self._db.reading() as s:
            found = UploadRepository(s).with_assignment(upload_id)
        if found is None:
            raise PermissionDenied("no assignment matches this upload")
        status, iteration_id, upload = found
        if status == AssignmentStatus.ASSIGNED:
            raise FailedPrecondition("report the result COMPLETED before uploading")
        if status not in (AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.UPLOADED):
            raise FailedPrecondition(f"this assignment is {status}; its upload is no longer needed")
        declared = first.total_size > 0 or bool(first.sha256_hex)
        if upload is None or (declared and upload.committed_size == 0 and upload.status != UploadStatus.COMPLETE):
            if first.write_offset != 0:
                raise OffsetMismatch(0, first.write_offset)
            self._check_metadata(first)
            fresh = UploadRecord(
                upload_id, upload_id, first.total_size, first.sha256_hex, 0, UploadStatus.IN_PROGRESS, None
            )
            return _Started(fresh, iteration_id, "new" if upload is None else "restart")
        if declared and (first.total_size, first.sha256_hex) != (upload.total_size, upload.sha256_hex):
            raise InvalidArgument("metadata", "differs from the upload in progress; resume with the same object")
        return _Started(upload, iteration_id, "stored")

    def _store_row(self, s: Session, started: _Started) -> None:
        """Write the upload's row as the stream found it: created, or restarted for this stream's object (from
        offset 0). A row another replica wrote meanwhile (a device that moved its stream) is restarted too: this
        stream holds every byte from 0; a row found COMPLETE is left as it is (the finish then sees it won)."""
        if started.row == "stored":
            return
        upload, now = started.upload, self._clock.now()
        uploads = UploadRepository(s)
        current = uploads.get(upload.upload_id)
        if current is None:
            uploads.start(
                upload.upload_id, upload.assignment_id, started.iteration_id, upload.total_size, upload.sha256_hex, now
            )
        elif current.status == UploadStatus.IN_PROGRESS:
            uploads.restart(upload.upload_id, upload.total_size, upload.sha256_hex, now)

    def _store_progress(self, started: _Started, start: int, offset: int, durable: bool) -> bool:
        """Record the bytes a stream committed (``start`` to ``offset``), if the assignment still wants them: its
        row lock, not the round's (whatever closes the round marks the assignment LATE or CANCELED under the
        round's lock and then abandons its upload row, so either it did so before, seen here, or it waits for this
        commit). Soft unless ``durable``: losing it only makes the device send those bytes again. False if the
        assignment no longer wants its upload (nothing written). A stream from offset 0 may have created the
        staging file: its directory is fsynced first, so that a power cut cannot lose the file's name while the row
        says its bytes are committed (a finished upload's file is renamed into the blob store, fsynced there)."""
        if start == 0:
            fsync_directory(self._staging)
        with self._db.transaction() if durable else self._db.soft_state() as s:
            assignment = AssignmentRepository(s).get(started.upload.upload_id, lock=True)
            if assignment is None or assignment.status not in (
                AssignmentStatus.LOCAL_COMPLETED,
                AssignmentStatus.UPLOADED,
            ):
                return False
            self._store_row(s, started)
            UploadRepository(s).advance(started.upload.upload_id, start, offset, self._clock.now())
        return True

    def _check_metadata(self, first: WriteChunk) -> None:
        if first.total_size <= 0:
            raise InvalidArgument("metadata.total_size_bytes", "must be declared (> 0) in the first message")
        if first.total_size > self._max_bytes:
            raise ResourceExhausted(
                f"metadata.total_size_bytes {first.total_size} exceeds the limit of {self._max_bytes} bytes"
            )
        if not _SHA.match(first.sha256_hex):
            raise InvalidArgument("metadata.sha256_hex", "must be 64 lowercase hex characters")

    def _receive(self, started: _Started, chunks: Iterator[WriteChunk]) -> WriteStatus:
        """Append the stream to the staged file, hashing as it arrives. Progress is made durable once, when the
        stream ends (finished, stopped or broken): fsync, then one transaction recording the committed size. A
        process killed mid-stream leaves the recorded size behind the file; a resume truncates to it."""
        upload = started.upload
        path = self._staging / f"upload-{upload.upload_id}"
        start = offset = upload.committed_size
        digest = hashlib.sha256()
        finished = kept = False
        held = path.stat().st_size if path.exists() else 0  # the writer lock is ours: no one else changes it
        if held < offset:  # staged elsewhere (another replica's disk) or lost: start over
            self._discard(upload, path)
            raise DataLoss("this server does not hold the upload's committed bytes; upload again from offset 0")
        if offset:
            with path.open("rb") as handle:
                _hash_prefix(handle, offset, digest)  # a resumed upload: the bytes already committed
        with UncachedAppender(path, offset) as out:  # cut to the committed size: drops what a crashed write left
            try:
                for chunk in chunks:
                    if chunk.write_offset != offset:
                        raise OffsetMismatch(offset, chunk.write_offset)
                    if offset + len(chunk.data) > upload.total_size:
                        raise InvalidArgument(
                            "data", f"more bytes than the declared total_size_bytes ({upload.total_size})"
                        )
                    out.write(chunk.data)
                    digest.update(chunk.data)
                    offset += len(chunk.data)
                    if chunk.finish_write:
                        finished = True
                        break
            finally:
                out.sync()  # past the page cache: read once more, by the aggregator (core/files.py)
                if not finished and offset != start:  # soft: losing it only makes the device resend
                    kept = self._store_progress(started, start, offset, durable=False)
        if not finished:
            if offset != start and not kept:
                raise FailedPrecondition("the round closed during this upload; its upload is no longer needed")
            return WriteStatus(offset, False)
        return self._finish(started, path, start, offset, digest.hexdigest())

    def _finish(self, started: _Started, path: Path, start: int, offset: int, sha256_hex: str) -> WriteStatus:
        upload = started.upload
        if offset != upload.total_size:
            if offset != start:
                self._store_progress(started, start, offset, durable=True)
            raise FailedPrecondition(f"finish_write after {offset} of {upload.total_size} declared bytes")
        if sha256_hex != upload.sha256_hex:
            self._discard(upload, path)
            raise DataLoss("the received bytes do not match the declared sha256; they were discarded, upload again")
        try:
            with path.open("rb") as handle:  # the header only: the ciphertext is stepped over, never read
                header = read_envelope_header(handle, offset)
            check_envelope(header, self._expected_context(upload, started.iteration_id))
        except InvalidArgument:
            self._discard(upload, path)
            raise
        # hashed once, as it arrived; fsynced by the stream that wrote its last bytes (``_receive``)
        blob = self._blobs.put_file(path, sha256_hex, synced=True)
        try:
            self._commit(started, blob, start)
        except _RoundClosed:
            self._blobs.delete(blob)  # never counted: no blob outlives the commit that would have counted it
            path.unlink(missing_ok=True)
            now = self._clock.now()
            with self._db.transaction() as s:
                AssignmentRepository(s).change_status(
                    upload.assignment_id, AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.LATE, now, "round closed"
                )
                # started after the collector abandoned the round's uploads: abandon it here
                UploadRepository(s).abandon(upload.upload_id, now, "round closed")
            raise FailedPrecondition("the round closed before this upload finished; it was not counted") from None
        return WriteStatus(upload.total_size, True)

    def _commit(self, started: _Started, blob: str, start: int) -> None:
        """Count the upload in a durable transaction shared with every upload finishing at the same moment (group
        commit, ``store.groupcommit``: one commit and one disk flush for all, each in a savepoint of its own).
        Under load the counts otherwise queued one by one on the round's row lock (Postgres, held through the
        commit's flush) or the single writer (SQLite), ~190 ms each at 16 concurrent uploads here."""
        closed: list[bool] = []  # the count closed the round (set in the batch; read once it committed)
        work = partial(self._count, started=started, blob=blob, start=start, closed=closed)
        if not self._counts.submit((started.iteration_id, work)):
            raise _RoundClosed()
        log.info("upload_finished", bytes=started.upload.total_size)
        if closed:
            self._on_round_closed()

    def _count(self, s: Session, started: _Started, blob: str, start: int, closed: list[bool]) -> tuple[bool, bool]:
        """The upload's row written complete, the assignment uploaded, the round counted (and closed at its report
        goal): (True, True); or (False, False), all of it rolled back, if the round closed first. Lock order:
        round, then upload, then assignment (as in check-in, cancel and the collector)."""
        upload, iteration_id, now = started.upload, started.iteration_id, self._clock.now()
        iterations = IterationRepository(s)
        iterations.lock(iteration_id)
        uploads = UploadRepository(s)
        whole = started.row == "new" and uploads.add_complete(
            upload.upload_id, upload.assignment_id, iteration_id, upload.total_size, upload.sha256_hex, blob, now
        )  # the common case, one stream from 0 to the end: its row written complete in one statement
        if not whole:
            self._store_row(s, started)
            uploads.advance(upload.upload_id, start, upload.total_size, now)
            if not uploads.complete(upload.upload_id, blob, now):
                current = uploads.get(upload.upload_id)
                if current is not None and current.status == UploadStatus.COMPLETE:
                    return True, True  # a concurrent finish won; same bytes, same answer
                return False, False  # abandoned when the round closed
        assignments = AssignmentRepository(s)
        if not assignments.change_status(
            upload.assignment_id, AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.UPLOADED, now
        ):
            return False, False
        count = iterations.count_upload(iteration_id, now)
        if count is None:
            return False, False
        if count >= self._round_facts(iteration_id).report_goal:
            iteration = iterations.get(iteration_id)
            assert iteration is not None
            close_round(s, self._ids, iteration, now)
            closed.append(True)
        return True, True

    def _round_facts(self, iteration_id: str) -> _RoundFacts:
        """The round's facts, read once per process (they never change once the round is open)."""
        facts = self._facts.get(iteration_id)
        if facts is None:
            with self._db.reading() as s:
                iteration = IterationRepository(s).get(iteration_id)
                assert iteration is not None
                task = TaskRepository(s).get(iteration.task_id)
                assert task is not None
            facts = _RoundFacts(
                task.spec.population_name, task.task_id, iteration.round, iteration.aggregation_id,
                iteration.base_model_version, task.plan_sha256, task.policy_sha256, iteration.report_goal,
            )  # fmt: skip
            if len(self._facts) > 10_000:
                self._facts.clear()
            self._facts[iteration_id] = facts
        return facts

    def _expected_context(self, upload: UploadRecord, iteration_id: str) -> ContributionContext:
        f = self._round_facts(iteration_id)
        return ContributionContext(
            f.population_name, f.task_id, f.round, f.aggregation_id, upload.assignment_id, "", f.model_version,
            f.plan_sha256, f.policy_sha256,
        )  # fmt: skip

    def _discard(self, upload: UploadRecord, path: Path) -> None:
        path.unlink(missing_ok=True)
        with self._db.transaction() as s:
            UploadRepository(s).restart(
                upload.upload_id, upload.total_size, upload.sha256_hex, self._clock.now(), upload.committed_size
            )
        log.warning("upload_discarded", upload_id=upload.upload_id)
