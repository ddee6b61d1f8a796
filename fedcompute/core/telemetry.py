"""The domain's Prometheus metrics, one set per component, created by its composition root into the process's
registry and handed to the services that count (never created at import time).

Names ``fedcompute_<component>_<thing>_<unit>``; labels bounded: reasons, results and status codes come from
closed enums, and the only task-valued label (ε spent, on key services: ``policy``, the access policy id, one
per task) has one series per DP task a provider released for, and tasks are created by operators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

ROUND_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


def _fresh(registry: CollectorRegistry | None) -> CollectorRegistry:
    return registry if registry is not None else CollectorRegistry()


@dataclass(frozen=True)
class ServerMetrics:
    """The orchestration server: the device funnel, round contributions, aggregation jobs."""

    checkins: Counter
    rejections: Counter
    reports: Counter
    uploads: Counter
    upload_bytes: Counter
    timeouts: Counter
    contributions: Counter
    lease_expiries: Counter
    idle_streams: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> ServerMetrics:
        reg = _fresh(registry)
        p = "fedcompute_server"
        return cls(
            Counter(f"{p}_checkins", "Device check-ins, by result (assigned, rejected).", ["result"], registry=reg),
            Counter(f"{p}_checkin_rejections", "Check-ins turned away, by rejection reason.", ["reason"], registry=reg),
            Counter(
                f"{p}_reports", "Devices' ReportResult calls, by the result they reported.", ["result"], registry=reg
            ),
            Counter(f"{p}_uploads_completed", "Encrypted updates whose upload completed.", registry=reg),
            Counter(f"{p}_upload_received_bytes", "Bytes of encrypted updates received.", registry=reg),
            Counter(f"{p}_assignment_timeouts", "Assignments timed out by the deadline sweeper.", registry=reg),
            Counter(
                f"{p}_round_contributions",
                "Contributions the aggregator reported per finished job, by result and reason (accepted: 'ok').",
                ["result", "reason"],
                registry=reg,
            ),
            Counter(
                f"{p}_job_lease_expiries", "Aggregation job leases that expired and were taken over.", registry=reg
            ),
            Counter(
                f"{p}_idle_streams_cancelled",
                "Device streams cancelled after STREAM_IDLE_S without moving, by method (Write: nothing sent; "
                "Read: nothing read).",
                ["method"],
                registry=reg,
            ),
        )


class JobsCollector(Collector):
    """``fedcompute_server_aggregation_jobs{status}``: read from the database at scrape time (one query); an
    unreachable database reads as NaN rather than failing the scrape."""

    def __init__(self, count_by_status: Callable[[], dict[str, int]], statuses: list[str]) -> None:
        self._count = count_by_status
        self._statuses = statuses

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "fedcompute_server_aggregation_jobs", "Aggregation jobs in the database, by status.", labels=["status"]
        )
        try:
            counts = {k: float(v) for k, v in self._count().items()}
        except Exception:
            counts = {s: float("nan") for s in self._statuses}
        for status in self._statuses:
            family.add_metric([status], counts.get(status, 0.0))
        yield family


@dataclass(frozen=True)
class UpdaterMetrics:
    """The model updater: rounds released and how long they took."""

    versions: Counter
    round_duration: Histogram
    failed_rounds: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> UpdaterMetrics:
        reg = _fresh(registry)
        p = "fedcompute_modelupdater"
        return cls(
            Counter(f"{p}_versions_published", "Model versions (or evaluation results) published.", registry=reg),
            Histogram(
                f"{p}_round_duration_seconds",
                "From a round's opening to its release.",
                buckets=ROUND_BUCKETS,
                registry=reg,
            ),
            Counter(
                f"{p}_rounds_failed", "Rounds whose aggregated update was refused (budget) or discarded.", registry=reg
            ),
        )


@dataclass(frozen=True)
class WorkerMetrics:
    """The attested aggregator worker: jobs, their time and the bytes they read."""

    jobs: Counter
    duration: Histogram
    contribution_bytes: Counter
    contributions: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> WorkerMetrics:
        reg = _fresh(registry)
        p = "fedcompute_aggregator"
        return cls(
            Counter(f"{p}_jobs", "Aggregation jobs finished, by result (completed, failed).", ["result"], registry=reg),
            Histogram(
                f"{p}_job_duration_seconds",
                "Time to aggregate one job, from claim to result.",
                buckets=JOB_BUCKETS,
                registry=reg,
            ),
            Counter(f"{p}_contribution_bytes", "Encrypted contribution bytes streamed in.", registry=reg),
            Counter(
                f"{p}_contributions",
                "Contributions processed, by result (accepted, rejected).",
                ["result"],
                registry=reg,
            ),
        )


@dataclass(frozen=True)
class KeyMetrics:
    """A key service: shares released, releases refused by status code, ε spent per task by its ledger."""

    releases: Counter
    refusals: Counter
    epsilon: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> KeyMetrics:
        reg = _fresh(registry)
        p = "fedcompute_keys"
        return cls(
            Counter(
                f"{p}_share_releases", "Key shares released, by kind (new input set, repeat).", ["kind"], registry=reg
            ),
            Counter(
                f"{p}_release_refusals", "Key share releases refused, by gRPC status code.", ["code"], registry=reg
            ),
            Gauge(
                f"{p}_epsilon_spent",
                "ε this provider's ledger has charged, per task's access policy id (DP only).",
                ["policy"],
                registry=reg,
            ),
        )


@dataclass(frozen=True)
class LoopMetrics:
    """A background loop (dealer, model updater): its passes by result, and the last successful one."""

    passes: Counter
    last_success: Gauge

    @classmethod
    def create(cls, component: str, registry: CollectorRegistry | None = None) -> LoopMetrics:
        reg = _fresh(registry)
        p = f"fedcompute_{component}"
        return cls(
            Counter(f"{p}_passes", "Passes of the component's loop, by result (ok, failed).", ["result"], registry=reg),
            Gauge(f"{p}_last_success_timestamp_seconds", "Unix time of the last pass that succeeded.", registry=reg),
        )

    def counted(self, step: Callable[[], bool | int]) -> Callable[[], bool | int]:
        """``step``, counted: a pass that raises counts as failed (and still raises, for the loop's backoff)."""

        def run() -> bool | int:
            try:
                result = step()
            except Exception:
                self.passes.labels("failed").inc()
                raise
            self.passes.labels("ok").inc()
            self.last_success.set_to_current_time()
            return result

        return run
