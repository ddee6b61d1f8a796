"""The aggregator's stage between a job's stream of contributions and its sum: each envelope read (from the
server's stream, or its blob directory where the worker shares the disk), hashed, checked against the job's input
list in stream order and opened, on ``OPEN_THREADS`` threads (docs/architecture.md, aggregation)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcompute.aggregator.contributions import JobContext, Opened, Rejected, open_contribution
from fedcompute.clients.typed import StreamedContribution
from fedcompute.core.blobs import BlobMissing, blob_path
from fedcompute.core.files import bounded_refusal, read_uncached
from fedcompute.core.prefetch import prefetched
from fedcompute.core.telemetry import WorkerMetrics
from fedcompute.v1 import aggregation_pb2

# contributions read, hashed, checked and opened at once, on threads of their own, and how many ahead of the summing
# thread (one waits for a free thread). Two threads hashing for a third that opened ran 0.589 of the aggregation
# benchmark's limit with DP here, this 0.641 (without DP 0.692 -> 0.748), interleaved in one run (bench/aggregate.py)
OPEN_THREADS = 2
OPEN_AHEAD = 3
# where the envelopes are files of this machine's disk (``LocalEnvelope``: the worker shares the server's blob
# directory), each thread also waits on the disk for every item (they were written past the page cache and are read
# so): four threads, six ahead, keep the CPU busy while two wait. A 100-contribution DP job read from such files
# here: 567 -> 474 ms (the disk alone reads them in ~450), while on items in memory four threads ran 5 % slower
DISK_THREADS = 4
DISK_AHEAD = 6
Hashed = tuple[str, bytes | memoryview, str]  # (assignment id, envelope, the envelope's sha256 hex)


class LocalEnvelope(NamedTuple):
    """An input's envelope as a file of the server's blob directory (``aggregator_blob_dir``), read when hashed."""

    assignment_id: str
    path: Path
    max_bytes: int


Item = StreamedContribution | aggregation_pb2.StreamContributionsResponse | LocalEnvelope


class Opener:
    """The one stage between a job's stream and its sum (``outcomes``), on ``OPEN_THREADS`` threads: each item is
    read and hashed (``digest``, by default ``read_and_hash``: several items at once), then checked against the
    job's input list strictly in stream order (an item waits for the check of every item before it: ``check``),
    then opened (``open``: several at once again). An item is opened only once it and every item before it
    matched the list. After a mismatch or an error nothing more is checked or opened, so no key is asked for on
    a refused stream and nothing after the first mismatch is ever opened; an open that raises stops the stage
    (an item already being opened on the other thread finishes: the job's keys are asked for once, a failure
    kept, ``JobKeys``)."""

    def __init__(
        self,
        inputs: list[tuple[str, str]],
        context: JobContext,
        keys: Callable[[str], X25519PrivateKey],
        metrics: WorkerMetrics,
        norms: bool = False,
        digest: Callable[[Item], Hashed] | None = None,
    ) -> None:
        self._inputs = inputs
        self._norms = norms  # DP: each update's norm is computed while opening, off the summing thread
        self._context = context
        self._keys = keys
        self._metrics = metrics
        self._digest = digest or read_and_hash
        self._stopped = False  # set by either step; each reads it before doing anything
        self._failed = False  # an open raised (it stopped the stage): nothing already checked is opened after it
        self._turn = threading.Condition()  # the checks' order: the stream's
        self._checked = 0  # items of the stream whose turn to be checked has passed
        self._used = False  # outcomes() was called: one stream per Opener
        self.matched = 0  # items that matched the input list so far
        self.refusal = ""  # why the stream was refused: the first item that did not match, named

    def outcomes(self, stream: Iterable[Item]) -> Generator[Opened | Rejected | None, None, None]:
        """Each item's outcome in stream order: opened, rejected (left out of the sum), or None (the stream is
        refused from there on: ``refusal`` says why); raises, in order, what reading an item or obtaining a key
        raised. Stopping early stops the stream too; one stream per Opener. A list of files (``local_envelopes``)
        is worked on by ``DISK_THREADS``, ``DISK_AHEAD`` ahead; anything else by ``OPEN_THREADS``, ``OPEN_AHEAD``
        ahead."""
        if self._used:  # the checks' turns count this stream's items from 0: a second stream would wait forever
            raise RuntimeError("an Opener checks one stream; make another for the next")
        self._used = True
        on_disk = isinstance(stream, list) and bool(stream) and isinstance(stream[0], LocalEnvelope)
        threads, ahead = (DISK_THREADS, DISK_AHEAD) if on_disk else (OPEN_THREADS, OPEN_AHEAD)
        taken = prefetched(enumerate(stream), self.take, ahead=ahead, threads=threads)
        try:
            for outcome in taken:  # noqa: UP028 (``yield from`` would close ``taken`` before ``_stopped`` is set)
                yield outcome
        finally:
            # stopped first, then the stage closed: the items already handed to its threads pass their turns
            # without being read, hashed or opened (none is cancelled: a later one may be waiting for its turn)
            self._stopped = True
            taken.close()
            if isinstance(stream, Generator):
                stream.close()

    def take(self, numbered: tuple[int, Item]) -> Opened | Rejected | None:
        """Item ``index`` of the stream: hashed now, checked in its turn, then opened if it matched."""
        index, item = numbered
        try:
            hashed = None if self._stopped else self._digest(item)
        except BaseException:
            self._in_turn(index, None)  # a read that failed stops the stream; the items after it wait for nothing
            raise
        return self.open(self._in_turn(index, hashed))

    def _in_turn(self, index: int, hashed: Hashed | None) -> tuple[bytes | memoryview, str] | None:
        with self._turn:
            self._turn.wait_for(lambda: self._checked == index)
            try:
                if hashed is None:
                    self._stopped = True
                    return None
                return self.check(hashed)
            except BaseException:
                self._stopped = True  # a check that raised stops the stream: nothing after it is checked or opened
                raise
            finally:
                self._checked = index + 1
                self._turn.notify_all()

    def check(self, hashed: Hashed) -> tuple[bytes | memoryview, str] | None:
        """The item if it is the input list's next (in order), else None and the refusal says why."""
        if self._stopped:
            return None
        assignment_id, envelope, sha256_hex = hashed
        self._metrics.contribution_bytes.inc(len(envelope))
        got = (assignment_id, sha256_hex)
        if self.matched >= len(self._inputs) or got != self._inputs[self.matched]:
            self._stopped = True
            self.refusal = _mismatch(self.matched, got, self._inputs)
            return None
        self.matched += 1
        return envelope, assignment_id

    def open(self, checked: tuple[bytes | memoryview, str] | None) -> Opened | Rejected | None:
        if checked is None or self._failed:
            self._stopped = True
            return None
        try:
            return open_contribution(checked[0], checked[1], self._context, self._keys, self._norms)
        except Rejected as refusal:
            return refusal
        except BaseException:
            self._stopped = self._failed = True
            raise


def read_and_hash(item: Item) -> Hashed:
    """(assignment id, envelope, its sha256): the envelope read once (from its file, past the page cache: it was
    written so and is read once; or the view of the streamed message the typed client's items hold)."""
    if isinstance(item, LocalEnvelope):
        envelope: bytes | memoryview = read_uncached(item.path, item.max_bytes)
    else:
        envelope = item.envelope
    return item.assignment_id, envelope, hashlib.sha256(envelope).hexdigest()


def local_envelopes(
    blob_dir: Path, inputs: list[tuple[str, str]], max_bytes: int
) -> tuple[list[LocalEnvelope], list[str]]:
    """Each input's envelope file in the blob directory (addressed by its sha256, ``core.blobs.blob_path``), and
    the assignment ids of those a bounded read would refuse now: missing, not a regular file (a link too: looked at
    without following it), over ``max_bytes``, or an address that is not a sha256 (the input list is the
    server's: such an address never names a path outside the directory)."""
    local: list[LocalEnvelope] = []
    missing: list[str] = []
    for assignment_id, sha256_hex in inputs:
        try:
            path = blob_path(blob_dir, sha256_hex)
            refused = bounded_refusal(path.lstat(), max_bytes)
        except (BlobMissing, OSError):
            refused = "missing"
        if refused:
            missing.append(assignment_id)
        else:
            local.append(LocalEnvelope(assignment_id, path, max_bytes))
    return local, missing


def _mismatch(index: int, got: tuple[str, str], inputs: list[tuple[str, str]]) -> str:
    """Why streamed item ``index`` is refused: the server sent more than the input set, another contribution, or
    this one's bytes altered (its store is the operator's: corrupted or replaced there)."""
    where = f"contribution {index} of the stream ({got[0]!r})"
    if index >= len(inputs):
        return f"{where} is past the job's input set of {len(inputs)}; refused"
    if got[0] != inputs[index][0]:
        return f"{where} is not the input set's contribution {index} ({inputs[index][0]!r}); refused"
    return (
        f"{where} does not hash to the input set's sha256 (altered or corrupted in the server's store: "
        f"{got[1][:12]}... instead of {inputs[index][1][:12]}...); nothing after it was opened"
    )
