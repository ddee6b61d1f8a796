"""Check-in (CreateTaskAssignment) against the health Check RPC of the same server, at 1, 16 and 64 callers.

One in-process suite per database (SQLite file, then a Postgres database of our own), no aggregator; one open
task whose cohort never fills, so every check-in takes a slot (an UPDATE and an INSERT in one transaction) and
gets a full assignment back. The limit is `grpc.health.v1.Health/Check` on the same server: same port, thread
pool (settings.worker_threads), interceptor (metrics, logs, error mapping) and channels, no database. The
callers run in the load generator process, each with its own channel and connection, in a closed loop for a fixed
time.
"""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from bench.common import LoadGenerator, Mode, Result, create_task, interleave, postgres_database, suite_settings
from fedcompute.core.memory import freeze_startup_heap, refreeze_after_imports
from fedcompute.suite import start_suite
from fedcompute.v1 import task_management_pb2 as tm

POPULATION = "bench-checkin"
CALLERS = (1, 16, 64)


def run(mode: Mode, load: LoadGenerator) -> list[Result]:
    results = []
    for database in ("sqlite", "postgres"):
        source: AbstractContextManager[str] = postgres_database() if database == "postgres" else nullcontext("")
        with tempfile.TemporaryDirectory(prefix="fedcompute-bench-") as tmp, source as url:
            results.extend(_one_database(mode, load, database, Path(tmp), url))
    return results


def _one_database(mode: Mode, load: LoadGenerator, database: str, tmp: Path, url: str) -> list[Result]:
    # the background loops at their production interval (1 s): the benchmark's 50 ms polling would otherwise burn
    # a third of a core that neither the product nor the echo needs (both are measured on the same server)
    suite = start_suite(suite_settings(tmp / "w", url, poll_interval_s=1.0), aggregator=False)
    freeze_startup_heap()  # as `serve` and `up` do once started (core/memory.py)
    try:
        spec = tm.TaskSpec(
            population_name=POPULATION, model_architecture="digits-linear-v1", rounds=1,
            report_goal=40_000, max_cohort=1_000_000,
            hyperparameters=tm.TrainingHyperparameters(local_epochs=1, batch_size=16, learning_rate=0.1),
        )  # fmt: skip
        create_task(suite, spec)
        refreeze_after_imports()  # the operator's plan export just ran here: as `serve` freezes it (core/memory.py)
        address = suite.server_address
        load.run(kind="checkin", address=address, population=POPULATION, concurrency=1, seconds=1.0)  # key, caches
        results = []
        for callers in CALLERS:
            checkin = {"kind": "checkin", "population": POPULATION}
            common = {"address": address, "concurrency": callers, "seconds": mode.seconds}
            product, limit = interleave(
                mode.pairs,
                lambda: load.run(**checkin, **common),  # noqa: B023 (called before the next iteration)
                lambda: load.run(kind="health", **common),  # noqa: B023
            )
            codes = {"product": _codes(product), "limit": _codes(limit)}
            name = f"checkin {database} x{callers}"
            notes = "CreateTaskAssignment vs health Check on the same server (same pool and interceptor)"
            results.append(
                Result(name, "calls/s", "calls/s", [p["per_s"] for p in product], [b["per_s"] for b in limit],
                       notes=notes, extra={"codes": codes})
            )  # fmt: skip
            results.append(
                Result(name, "p99", "ms", [p["p99_ms"] for p in product], [b["p99_ms"] for b in limit],
                       lower_is_better=True, notes=notes)
            )  # fmt: skip
        return results
    finally:
        suite.stop(grace=0)


def _codes(samples: list[dict[str, object]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for sample in samples:
        for code, n in dict(sample["codes"]).items():  # type: ignore[call-overload]
            total[code] = total.get(code, 0) + int(n)
    return total
