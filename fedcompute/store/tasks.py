"""Task repository."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fedcompute.core.clock import as_utc
from fedcompute.core.privacy import DpSpec
from fedcompute.core.records import TaskRecord
from fedcompute.core.tasks import Hyperparameters, TaskSpec
from fedcompute.store.history import change_status, record_created
from fedcompute.store.ledger import LedgerRepository
from fedcompute.store.models import TaskRow


def _spec_to_json(spec: TaskSpec) -> str:
    data = asdict(spec)
    data.pop("initial_weights")
    data.pop("plan")  # kept in the plan column
    return json.dumps(data, sort_keys=True)


def _spec_from_json(text: str) -> TaskSpec:
    data = json.loads(text)
    data["hyperparameters"] = Hyperparameters(**data["hyperparameters"])
    data["dp"] = DpSpec(**data["dp"]) if data.get("dp") else None
    return TaskSpec(**data)


def to_record(row: TaskRow) -> TaskRecord:
    return TaskRecord(
        task_id=row.id,
        spec=_spec_from_json(row.spec_json),
        status=row.status,
        current_round=row.current_round,
        latest_model_version=row.latest_model_version,
        plan_sha256=row.plan_sha256,
        plan_size=len(row.plan),
        created_at=as_utc(row.created_at),
        status_reason=row.status_reason,
        access_policy=row.access_policy,
        policy_sha256=row.policy_sha256,
        model_name=row.model_name,
        parameter_count=row.parameter_count,
    )


class TaskRepository:
    def __init__(self, session: Session) -> None:
        self._s = session

    def add(
        self,
        task_id: str,
        spec: TaskSpec,
        plan: bytes,
        plan_sha256: str,
        status: str,
        now: datetime,
        access_policy: bytes = b"",
        policy_sha256: str = "",
        model_name: str = "",
        parameter_count: int = 0,
    ) -> None:
        self._s.add(
            TaskRow(
                id=task_id,
                population_name=spec.population_name,
                status=status,
                spec_json=_spec_to_json(spec),
                plan=plan,
                plan_sha256=plan_sha256,
                current_round=0,
                latest_model_version=0,
                status_reason="",
                created_at=now,
                updated_at=now,
                access_policy=access_policy,
                policy_sha256=policy_sha256,
                model_name=model_name,
                parameter_count=parameter_count,
            )
        )
        record_created(self._s, "task", task_id, status, now)

    def status_shared(self, task_id: str) -> str | None:
        """The task's status, its row share-locked until the transaction ends (Postgres ``FOR SHARE``: a change of
        it waits; SQLite's writers are serialized anyway)."""
        query = select(TaskRow.status).where(TaskRow.id == task_id).with_for_update(read=True)
        status: str | None = self._s.scalar(query)
        return status

    def get(self, task_id: str) -> TaskRecord | None:
        row = self._s.get(TaskRow, task_id)
        return self._with_epsilon([row])[0] if row else None

    def _with_epsilon(self, rows: Sequence[TaskRow]) -> list[TaskRecord]:
        spent = LedgerRepository(self._s).epsilon_by_task([r.id for r in rows])
        return [replace(to_record(r), epsilon_spent=spent.get(r.id, 0.0)) for r in rows]

    def plan(self, task_id: str) -> bytes | None:
        return self._s.scalar(select(TaskRow.plan).where(TaskRow.id == task_id))

    def page(self, population: str, after: str, limit: int, status: str = "") -> list[TaskRecord]:
        query = select(TaskRow).where(TaskRow.id > after).order_by(TaskRow.id).limit(limit)
        if population:
            query = query.where(TaskRow.population_name == population)
        if status:
            query = query.where(TaskRow.status == status)
        return self._with_epsilon(list(self._s.scalars(query)))

    def open_for_population(self, population: str) -> list[TaskRecord]:
        query = (
            select(TaskRow)
            .where(TaskRow.population_name == population, TaskRow.status == "OPEN")
            .order_by(TaskRow.created_at, TaskRow.id)
        )
        return [to_record(r) for r in self._s.scalars(query)]

    def set_progress(self, task_id: str, current_round: int, latest_model_version: int, now: datetime) -> None:
        self._s.execute(
            update(TaskRow)
            .where(TaskRow.id == task_id)
            .values(current_round=current_round, latest_model_version=latest_model_version, updated_at=now)
        )

    def change_status(self, task_id: str, from_status: str, to_status: str, now: datetime, reason: str) -> bool:
        return change_status(
            self._s, TaskRow, "task", task_id, from_status, to_status, now, reason, status_reason=reason
        )
