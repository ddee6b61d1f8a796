"""Resumable, hashed uploads of encrypted updates (google.bytestream semantics).

Bytes go to a staging file that is fsynced before the committed size advances in the store, so a device can
resume from ``QueryWriteStatus`` after any failure. The bytes are hashed as they arrive; on finish the hash is
checked against the declared sha256, the envelope's header (not its ciphertext) checked to be bound to this
assignment, the file moved into the blob store, and counted.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
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
from fedcompute.core.records import UploadRecord
from fedcompute.core.transitions import AssignmentStatus, UploadStatus
from fedcompute.keys.envelope import check_envelope, read_envelope_header
from fedcompute.rpc.auth import TokenSigner
from fedcompute.server.assignment import UPLOAD
from fedcompute.store.assignments import AssignmentRepository, UploadRepository
from fedcompute.store.blobstores import StagedBlobStore
from fedcompute.store.database import Database, Session
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.rounds import close_round
from fedcompute.store.tasks import TaskRepository

log = structlog.get_logger("fedcompute.upload")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^uploads/(asg_[A-Za-z0-9_-]+)$")
LOCK_STRIPES = 256


@dataclass(frozen=True)
class WriteChunk:
    resource_name: str
    write_offset: int
    finish_write: bool
    data: bytes
    upload_token: str
    total_size: int = 0
    sha256_hex: str = ""


@dataclass(frozen=True)
class WriteStatus:
    committed_size: int
    complete: bool


class _RoundClosed(Exception):
    pass


def _hash_prefix(handle: BinaryIO, size: int, digest: Any) -> bool:
    """Feed the first ``size`` bytes of ``handle`` into ``digest``; False if the file holds fewer (a resumed
    upload whose staged bytes this process does not have)."""
    handle.seek(0)
    left = size
    while left > 0:
        block = handle.read(min(left, 1 << 20))
        if not block:
            return False
        digest.update(block)
        left -= len(block)
    return True


class UploadService:
    def __init__(
        self,
        db: Database,
        blobs: StagedBlobStore,
        clock: Clock,
        ids: IdGenerator,
        signer: TokenSigner,
        max_bytes: int,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._staging = blobs.staging_dir()
        self._clock = clock
        self._ids = ids
        self._signer = signer
        self._max_bytes = max_bytes
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]

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
        with self._lock_for(upload_id):
            upload = self._begin(upload_id, first)
            if upload.status == UploadStatus.COMPLETE:
                return WriteStatus(upload.total_size, True)
            if first.write_offset != upload.committed_size:
                raise OffsetMismatch(upload.committed_size, first.write_offset)
            return self._receive(upload, chain([first], chunks))

    def _lock_for(self, upload_id: str) -> threading.Lock:
        """Serializes writes to one upload within this process (striped: memory stays bounded)."""
        return self._locks[int(hashlib.sha256(upload_id.encode()).hexdigest()[:8], 16) % LOCK_STRIPES]

    def _begin(self, upload_id: str, first: WriteChunk) -> UploadRecord:
        """The upload's row (created, or restarted for a new declared object): soft state, since a crash that loses
        it only sends the device back to offset 0 (``QueryWriteStatus`` then says 0, and the staged bytes past the
        recorded size are truncated), so its commit does not wait for the disk."""
        now = self._clock.now()
        with self._db.soft_state() as s:
            # the assignment's row lock, not the round's (every upload of a round would queue on that): whatever
            # closes the round marks this assignment LATE or CANCELED under the round's lock, so either it did
            # so before (seen here) or it waits for this commit and then abandons the upload row made here
            assignment = AssignmentRepository(s).get(upload_id, lock=True)
            if assignment is None:
                raise PermissionDenied("no assignment matches this upload")
            if assignment.status == AssignmentStatus.ASSIGNED:
                raise FailedPrecondition("report the result COMPLETED before uploading")
            if assignment.status not in (AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.UPLOADED):
                raise FailedPrecondition(f"this assignment is {assignment.status}; its upload is no longer needed")
            uploads = UploadRepository(s)
            upload = uploads.get(upload_id)
            declared = first.total_size > 0 or bool(first.sha256_hex)
            if upload is None or (declared and upload.committed_size == 0 and upload.status != UploadStatus.COMPLETE):
                if first.write_offset != 0:
                    raise OffsetMismatch(0, first.write_offset)
                self._check_metadata(first)
                if upload is None:
                    uploads.start(
                        upload_id, upload_id, assignment.iteration_id, first.total_size, first.sha256_hex, now
                    )
                else:
                    uploads.restart(upload_id, first.total_size, first.sha256_hex, now)
                s.flush()
                upload = uploads.get(upload_id)
            elif declared and (first.total_size, first.sha256_hex) != (upload.total_size, upload.sha256_hex):
                raise InvalidArgument("metadata", "differs from the upload in progress; resume with the same object")
        assert upload is not None
        return upload

    def _check_metadata(self, first: WriteChunk) -> None:
        if first.total_size <= 0:
            raise InvalidArgument("metadata.total_size_bytes", "must be declared (> 0) in the first message")
        if first.total_size > self._max_bytes:
            raise ResourceExhausted(
                f"metadata.total_size_bytes {first.total_size} exceeds the limit of {self._max_bytes} bytes"
            )
        if not _SHA.match(first.sha256_hex):
            raise InvalidArgument("metadata.sha256_hex", "must be 64 lowercase hex characters")

    def _receive(self, upload: UploadRecord, chunks: Iterator[WriteChunk]) -> WriteStatus:
        """Append the stream to the staged file, hashing as it arrives. Progress is made durable once, when the
        stream ends (finished, stopped or broken): fsync, then one transaction recording the committed size. A
        process killed mid-stream leaves the recorded size behind the file; a resume truncates to it."""
        path = self._staging / f"upload-{upload.upload_id}"
        start = offset = upload.committed_size
        digest = hashlib.sha256()
        finished = False
        with path.open("r+b" if path.exists() else "wb") as handle:
            handle.truncate(offset)  # drop bytes a crashed write left past the committed size
            if not _hash_prefix(handle, offset, digest):  # a resumed upload: the bytes already committed
                self._discard(upload, path)  # staged elsewhere (another replica) or lost: start over
                raise DataLoss("this server does not hold the upload's committed bytes; upload again from offset 0")
            handle.seek(offset)
            try:
                for chunk in chunks:
                    if chunk.write_offset != offset:
                        raise OffsetMismatch(offset, chunk.write_offset)
                    if offset + len(chunk.data) > upload.total_size:
                        raise InvalidArgument(
                            "data", f"more bytes than the declared total_size_bytes ({upload.total_size})"
                        )
                    handle.write(chunk.data)
                    digest.update(chunk.data)
                    offset += len(chunk.data)
                    if chunk.finish_write:
                        finished = True
                        break
            finally:
                handle.flush()
                os.fsync(handle.fileno())
                if not finished and offset != start:  # soft: losing it only makes the device resend
                    with self._db.soft_state() as s:
                        UploadRepository(s).advance(upload.upload_id, start, offset, self._clock.now())
        if not finished:
            return WriteStatus(offset, False)
        return self._finish(upload, path, start, offset, digest.hexdigest())

    def _finish(self, upload: UploadRecord, path: Path, start: int, offset: int, sha256_hex: str) -> WriteStatus:
        if offset != upload.total_size:
            if offset != start:
                with self._db.transaction() as s:
                    UploadRepository(s).advance(upload.upload_id, start, offset, self._clock.now())
            raise FailedPrecondition(f"finish_write after {offset} of {upload.total_size} declared bytes")
        if sha256_hex != upload.sha256_hex:
            self._discard(upload, path)
            raise DataLoss("the received bytes do not match the declared sha256; they were discarded, upload again")
        try:
            with path.open("rb") as handle:  # the header only: the ciphertext is stepped over, never read
                header = read_envelope_header(handle, offset)
            check_envelope(header, self._expected_context(upload))
        except InvalidArgument:
            self._discard(upload, path)
            raise
        blob = self._blobs.put_file(path, sha256_hex)  # hashed once, as it arrived
        try:
            self._commit(upload, blob, start)
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

    def _commit(self, upload: UploadRecord, blob: str, start: int) -> None:
        self._db.run(lambda s: self._count(s, upload, blob, start))
        log.info("upload_finished", bytes=upload.total_size)

    def _count(self, s: Session, upload: UploadRecord, blob: str, start: int) -> None:
        """One transaction: the bytes committed, the upload complete, the assignment uploaded, the round counted.
        Lock order: round, then upload, then assignment (as in check-in, cancel and the collector)."""
        now = self._clock.now()
        found = AssignmentRepository(s).get(upload.assignment_id)
        assert found is not None
        iteration_id = found.iteration_id
        iterations = IterationRepository(s)
        iterations.lock(iteration_id)
        uploads = UploadRepository(s)
        uploads.advance(upload.upload_id, start, upload.total_size, now)
        if not uploads.complete(upload.upload_id, blob, now):
            current = uploads.get(upload.upload_id)
            if current is not None and current.status == UploadStatus.COMPLETE:
                return  # a concurrent finish won; same bytes, same answer
            raise _RoundClosed()  # abandoned when the round closed
        assignments = AssignmentRepository(s)
        if not assignments.change_status(
            upload.assignment_id, AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.UPLOADED, now
        ):
            raise _RoundClosed()
        count = iterations.count_upload(iteration_id, now)
        if count is None:
            raise _RoundClosed()
        iteration = iterations.get(iteration_id)
        assert iteration is not None
        if count >= iteration.report_goal:
            close_round(s, self._ids, iteration, now)

    def _expected_context(self, upload: UploadRecord) -> ContributionContext:
        with self._db.reading() as s:
            assignment = AssignmentRepository(s).get(upload.assignment_id)
            assert assignment is not None
            iteration = IterationRepository(s).get(assignment.iteration_id)
            task = TaskRepository(s).get(assignment.task_id)
        assert iteration is not None
        assert task is not None
        return ContributionContext(
            task.spec.population_name,
            task.task_id,
            iteration.round,
            iteration.aggregation_id,
            upload.assignment_id,
            "",
            iteration.base_model_version,
            task.plan_sha256,
            task.policy_sha256,
        )

    def _discard(self, upload: UploadRecord, path: Path) -> None:
        path.unlink(missing_ok=True)
        with self._db.transaction() as s:
            UploadRepository(s).restart(upload.upload_id, upload.total_size, upload.sha256_hex, self._clock.now())
        log.warning("upload_discarded", upload_id=upload.upload_id)
