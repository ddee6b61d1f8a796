"""Device check-in and result reports (ODP's TaskAssignment core)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import structlog

from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.errors import InvalidArgument, NotFound, PermissionDenied
from fedcompute.core.records import IterationRecord, TaskRecord
from fedcompute.core.transitions import AssignmentStatus, IterationStatus
from fedcompute.core.versions import in_range
from fedcompute.rpc.auth import TokenSigner
from fedcompute.server.keyring import KeyRing
from fedcompute.store.admission import Admission, AdmissionQueue
from fedcompute.store.assignments import AssignmentRepository
from fedcompute.store.database import Database, Session
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.model_versions import ModelVersionRepository
from fedcompute.store.tasks import TaskRepository
from fedcompute.v1 import common_pb2

log = structlog.get_logger("fedcompute.assignment")
OPEN_TASKS_TTL_S = 1.0
SESSION = "session"
UPLOAD = "upload"


class Rejection(StrEnum):
    NO_TASK_AVAILABLE = "NO_TASK_AVAILABLE"
    NO_ACTIVE_TASK = "NO_ACTIVE_TASK"
    CLIENT_VERSION_MISMATCH = "CLIENT_VERSION_MISMATCH"
    RESULT_NOT_NEEDED = "RESULT_NOT_NEEDED"


@dataclass(frozen=True)
class Refusal:
    reason: Rejection
    message: str
    cohort: int = 0  # devices the population's open rounds take (pace steering sizes retry windows by it)


@dataclass(frozen=True)
class Assignment:
    assignment_id: str
    session_token: str
    task: TaskRecord
    iteration: IterationRecord
    checkpoint_sha256: str
    checkpoint_size: int
    encryption_key: common_pb2.PublicKey


@dataclass(frozen=True)
class _OpenRound:
    """A round seen OPEN (its row as read; ``assigned`` goes stale at once) and its checkpoint's facts."""

    iteration: IterationRecord
    sha256: str
    size: int
    read_at: float  # monotonic


@dataclass(frozen=True)
class UploadGrant:
    resource_name: str
    upload_token: str
    deadline: datetime  # the task's upload deadline after the report


def upload_resource_name(assignment_id: str) -> str:
    return f"uploads/{assignment_id}"


def weighted_order(tasks: list[TaskRecord], rng: random.Random) -> list[TaskRecord]:
    """Tasks in a random order weighted by traffic_weight (Efraimidis-Spirakis keys u^(1/w), largest first)."""
    keyed = [(rng.random() ** (1.0 / t.spec.traffic_weight), t.task_id, t) for t in tasks]
    return [t for _, _, t in sorted(keyed, key=lambda k: (-k[0], k[1]))]


def too_soon(task: TaskRecord, round_: int, done: set[tuple[str, int]]) -> bool:
    """The device took part in this task less than min_separation_rounds rounds ago (or in this round)."""
    gap = task.spec.min_separation_rounds
    return any(t == task.task_id and round_ - gap < r <= round_ for t, r in done)


class AssignmentService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        ids: IdGenerator,
        signer: TokenSigner,
        keyring: KeyRing,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic  # the open-tasks and open-rounds caches' age only
        self._rng = rng or random.Random()  # selection order only; nothing secret depends on it
        self._db = db
        self._clock = clock
        self._ids = ids
        self._signer = signer
        self._keyring = keyring
        self._open_cache: dict[str, tuple[float, list[TaskRecord]]] = {}
        self._refreshing = threading.Lock()  # one caller re-reads an expired cache entry; the others use it meanwhile
        self._admissions = AdmissionQueue(db)
        self._open_rounds: dict[str, _OpenRound] = {}  # task_id -> its open round as last read here
        self._versions: dict[tuple[str, int], tuple[str, int]] = {}
        self._report_facts: dict[str, tuple[str, int]] = {}  # iteration id -> (aggregation id, upload window s)

    def check_in(self, population: str, client_version: str, done: set[tuple[str, int]]) -> Assignment | Refusal:
        if not population.strip():
            raise InvalidArgument("population_name", "must not be empty")
        tasks = self._open_tasks(population)
        if not tasks:
            return Refusal(Rejection.NO_ACTIVE_TASK, f"no open task for population {population!r}")
        eligible = [t for t in tasks if in_range(client_version, t.spec.min_client_version, t.spec.max_client_version)]
        if not eligible:
            return Refusal(
                Rejection.CLIENT_VERSION_MISMATCH,
                f"client version {client_version!r} is outside every open task's supported range",
            )
        key = self._keyring.active_key(population)
        for task in weighted_order(eligible, self._rng):
            assignment = self._admit(task, done, key)
            if assignment:
                return assignment
        cohort = sum(t.spec.max_cohort for t in eligible)
        return Refusal(Rejection.NO_TASK_AVAILABLE, "every open round is full or already done by this device", cohort)

    def _open_tasks(self, population: str) -> list[TaskRecord]:
        """The population's open tasks, read at most every ``OPEN_TASKS_TTL_S`` per process (a deferred read).
        Safe to be a moment stale: admission checks the round's state in its own transaction, so a task just
        closed admits nobody; a task created through this process is seen at once (``forget_open_tasks``), one
        created through another replica within the TTL. An empty answer is not kept, and drops what was."""
        now = self._monotonic()
        cached = self._open_cache.get(population)
        if cached is not None and (now - cached[0] < OPEN_TASKS_TTL_S or not self._refreshing.acquire(blocking=False)):
            return cached[1]  # fresh, or stale while another caller reads it again (not every caller at once)
        try:
            with self._db.reading() as s:
                tasks = TaskRepository(s).open_for_population(population)
        finally:
            if cached is not None:
                self._refreshing.release()
        if len(self._open_cache) > 10_000:  # populations are few; never let a flood of names grow it unbounded
            self._open_cache.clear()
        if tasks:
            self._open_cache[population] = (now, tasks)
        else:  # its last task ended: an expired list kept would be handed to callers while another one re-reads
            self._open_cache.pop(population, None)
        return tasks

    def forget_open_tasks(self) -> None:
        """A task was created or canceled here: the next check-in reads the open tasks (and rounds) again."""
        self._open_cache.clear()
        self._open_rounds.clear()

    def _admit(self, task: TaskRecord, done: set[tuple[str, int]], key: common_pb2.PublicKey) -> Assignment | None:
        """Take a slot in the task's open round and add the assignment: one write, group-committed with the
        check-ins arriving at the same moment (``store.admission``: the write itself checks the round is still
        OPEN and not full, so a round that closed or filled admits nobody).
        The round comes from this process's cache when it has it; a refusal is never decided on the cache alone:
        the round is read again (no write lock) and, if it is a different open one, tried once more."""
        cached = self._open_rounds.get(task.task_id)
        fresh = cached is None or self._monotonic() - cached.read_at >= OPEN_TASKS_TTL_S
        if not fresh:
            round_ = cached
        elif cached is None:
            round_ = self._read_round(task.task_id)
        elif self._refreshing.acquire(blocking=False):
            try:
                round_ = self._read_round(task.task_id)
            finally:
                self._refreshing.release()
        else:  # stale, and another caller is reading it again: use it (a refusal reads it afresh anyway)
            round_, fresh = cached, False
        while True:
            if round_ is not None and not too_soon(task, round_.iteration.round, done):
                assignment_id = self._ids.new_id("asg")
                now = self._clock.now()
                if self._admissions.admit(Admission(round_.iteration.iteration_id, assignment_id, task.task_id, now)):
                    log.debug("assignment_created", task_id=task.task_id, round=round_.iteration.round)
                    token = self._signer.token(SESSION, assignment_id)
                    return Assignment(assignment_id, token, task, round_.iteration, round_.sha256, round_.size, key)
            if fresh:
                return None
            round_, fresh = self._read_round(task.task_id), True

    def _read_round(self, task_id: str) -> _OpenRound | None:
        """The task's current round if it is OPEN with a free slot (kept for the next check-ins), else None."""
        with self._db.reading() as s:
            current = IterationRepository(s).current(task_id)
            if current is None or current.status != IterationStatus.OPEN or current.assigned >= current.max_cohort:
                self._open_rounds.pop(task_id, None)
                return None
            sha256, size = self._checkpoint(s, task_id, current.base_model_version)
        if len(self._open_rounds) > 10_000:
            self._open_rounds.clear()
        round_ = _OpenRound(current, sha256, size, self._monotonic())
        self._open_rounds[task_id] = round_
        return round_

    def _facts_for_report(self, s: Session, iteration_id: str, task_id: str) -> tuple[str, int]:
        """(the round's aggregation id, its task's upload deadline in s): fixed once the round is open (a task's
        spec never changes), so read once per round per process (bounded), not in every report."""
        found = self._report_facts.get(iteration_id)
        if found is None:
            iteration = IterationRepository(s).get(iteration_id)
            task = TaskRepository(s).get(task_id)
            assert iteration is not None
            found = (iteration.aggregation_id, task.spec.upload_deadline_s if task else 0)
            if len(self._report_facts) > 10_000:
                self._report_facts.clear()
            self._report_facts[iteration_id] = found
        return found

    def _checkpoint(self, s: Session, task_id: str, version: int) -> tuple[str, int]:
        """(sha256, size) of a model version: immutable once published, so kept per process (bounded)."""
        found = self._versions.get((task_id, version))
        if found is None:
            record = ModelVersionRepository(s).get(task_id, version)
            assert record is not None
            found = (record.checkpoint_sha256, record.size_bytes)
            if len(self._versions) > 10_000:
                self._versions.clear()
            self._versions[(task_id, version)] = found
        return found

    def report(
        self, assignment_id: str, session_token: str, task_id: str, aggregation_id: str, result: str
    ) -> UploadGrant | Refusal | None:
        """Record a device's local result; COMPLETED returns where to upload. Repeats give the same answer."""
        if not result or result == "UNSPECIFIED":
            raise InvalidArgument("result", "must be one of COMPLETED, FAILED, NOT_ELIGIBLE, FAILED_*")
        now = self._clock.now()
        with self._db.transaction() as s:
            assignments = AssignmentRepository(s)
            record = assignments.get(assignment_id)
            if record is None:
                raise NotFound(f"assignment {assignment_id!r} does not exist")
            if not self._signer.verify(SESSION, assignment_id, session_token):
                raise PermissionDenied("session_token is not valid for this assignment")
            expected_aggregation, upload_window_s = self._facts_for_report(s, record.iteration_id, record.task_id)
            if task_id and task_id != record.task_id:
                raise InvalidArgument("task_id", "does not match the assignment")
            if aggregation_id and aggregation_id != expected_aggregation:
                raise InvalidArgument("aggregation_id", "does not match the assignment")
            status = record.status
            reported_at = record.changed_at or now
            if status == AssignmentStatus.ASSIGNED:
                target = AssignmentStatus.LOCAL_COMPLETED if result == "COMPLETED" else AssignmentStatus.LOCAL_FAILED
                if assignments.change_status(assignment_id, status, target, now, result, result_code=result):
                    status, reported_at = target, now
                else:  # changed since the read (the deadline sweeper timed it out, say): answer what it is now
                    current = assignments.get(assignment_id)
                    assert current is not None
                    status, reported_at = current.status, current.changed_at or now
        if status in (AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.UPLOADED):
            name = upload_resource_name(assignment_id)
            window = timedelta(seconds=upload_window_s)
            return UploadGrant(name, self._signer.token(UPLOAD, name), reported_at + window)
        if status in (AssignmentStatus.LATE, AssignmentStatus.CANCELED):
            return Refusal(Rejection.RESULT_NOT_NEEDED, "the round this assignment belongs to has closed")
        if status == AssignmentStatus.TIMED_OUT:
            return Refusal(
                Rejection.RESULT_NOT_NEEDED, "this assignment missed its deadline; its slot went to another device"
            )
        return None
