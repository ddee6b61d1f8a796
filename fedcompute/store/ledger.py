"""The privacy ledger: every DP release of a task, with the ε spent once it was published."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedcompute.store.models import PrivacyLedgerRow


@dataclass(frozen=True)
class Charge:
    task_id: str
    model_version: int
    round: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    accountant: str
    clip_norm: float


class LedgerRepository:
    def __init__(self, session: Session) -> None:
        self._s = session

    def releases(self, task_id: str) -> int:
        count = self._s.scalar(select(func.count()).where(PrivacyLedgerRow.task_id == task_id))
        return int(count or 0)

    def epsilon_spent(self, task_id: str) -> float:
        value = self._s.scalar(select(func.max(PrivacyLedgerRow.epsilon)).where(PrivacyLedgerRow.task_id == task_id))
        return float(value or 0.0)

    def epsilon_by_task(self, task_ids: Sequence[str]) -> dict[str, float]:
        if not task_ids:
            return {}
        query = (
            select(PrivacyLedgerRow.task_id, func.max(PrivacyLedgerRow.epsilon))
            .where(PrivacyLedgerRow.task_id.in_(task_ids))
            .group_by(PrivacyLedgerRow.task_id)
        )
        return {task_id: float(eps) for task_id, eps in self._s.execute(query)}

    def by_version(self, task_id: str) -> dict[int, tuple[float, float]]:
        """model version -> (ε spent, clip norm)."""
        rows = self._s.scalars(select(PrivacyLedgerRow).where(PrivacyLedgerRow.task_id == task_id))
        return {r.model_version: (r.epsilon, r.clip_norm) for r in rows}

    def charge(self, charge: Charge, now: datetime) -> None:
        self._s.add(
            PrivacyLedgerRow(
                task_id=charge.task_id,
                release=self.releases(charge.task_id) + 1,
                model_version=charge.model_version,
                round=charge.round,
                epsilon=charge.epsilon,
                delta=charge.delta,
                noise_multiplier=charge.noise_multiplier,
                sample_rate=charge.sample_rate,
                accountant=charge.accountant,
                clip_norm=charge.clip_norm,
                created_at=now,
            )
        )
