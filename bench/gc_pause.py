"""What a full garbage collection costs a loaded server, with start-up's objects frozen (`core/memory.py`) and not.

    .venv/bin/python -m bench.gc_pause [--pairs N] [--seconds S]

Not part of `make bench` (its figure is a pause, not a ratio). One in-process suite on Postgres (as the check-in
benchmark); per window, 64 devices check in for ``--seconds`` (the load generator's closed loop) with the heap
frozen or not, the two alternated; reported per state: check-ins/s and p99 of each window, the full collections
the interpreter ran by itself during it (count and their longest), then one full collection run on purpose right
after the window, timed. Unfreezing (``gc.unfreeze``) puts start-up's objects back where a collection walks them,
as in a process that never froze them.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import checkin
from bench.common import LoadGenerator, create_task, postgres_database, suite_settings
from fedcompute.core.logs import configure_logging
from fedcompute.core.memory import freeze_startup_heap
from fedcompute.suite import start_suite
from fedcompute.v1 import task_management_pb2 as tm

CALLERS = 64


class FullCollections:
    """The interpreter's own oldest-generation collections, timed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._began = 0.0
        gc.callbacks.append(self._seen)

    def _seen(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    configure_logging(json_lines=False, level=logging.ERROR)
    rows: dict[str, list[dict[str, float]]] = {"not frozen": [], "frozen": []}
    with tempfile.TemporaryDirectory(prefix="fedcompute-bench-") as tmp, postgres_database() as url:
        suite = start_suite(suite_settings(Path(tmp) / "w", url), aggregator=False)
        try:
            spec = tm.TaskSpec(
                population_name=checkin.POPULATION, model_architecture="digits-linear-v1", rounds=1,
                report_goal=40_000, max_cohort=1_000_000,
                hyperparameters=tm.TrainingHyperparameters(local_epochs=1, batch_size=16, learning_rate=0.1),
            )  # fmt: skip
            create_task(suite, spec)
            load_command = {"kind": "checkin", "address": suite.server_address, "population": checkin.POPULATION}
            with LoadGenerator() as load:
                load.run(**load_command, concurrency=1, seconds=1.0)  # the key, the caches
                collections = FullCollections()
                for _ in range(args.pairs):
                    for state in rows:
                        if state == "frozen":
                            freeze_startup_heap()
                        collections.pauses.clear()
                        result = load.run(**load_command, concurrency=CALLERS, seconds=args.seconds)
                        during = list(collections.pauses)
                        began = time.perf_counter()
                        gc.collect()
                        rows[state].append({
                            "per_s": result["per_s"], "p99_ms": result["p99_ms"], "full_during": len(during),
                            "longest_during_ms": 1000 * max(during, default=0.0),
                            "full_after_ms": 1000 * (time.perf_counter() - began),
                        })  # fmt: skip
                        gc.unfreeze()
        finally:
            suite.stop(grace=0)
    print(f"{CALLERS} callers, {args.seconds:.0f} s windows, Postgres; medians [min-max] over {args.pairs} windows")
    for state, samples in rows.items():
        cells = []
        for key, unit in (("per_s", "/s"), ("p99_ms", " ms p99"), ("full_after_ms", " ms a full collection")):
            values = [s[key] for s in samples]
            cells.append(f"{statistics.median(values):.1f}{unit} [{min(values):.1f}-{max(values):.1f}]")
        during = [s["longest_during_ms"] for s in samples if s["full_during"]]
        count = sum(s["full_during"] for s in samples)
        own = f"{count} full collections of its own, longest {max(during, default=0):.1f} ms"
        print(f"{state:>10}: " + "; ".join(cells) + f"; {own}")


if __name__ == "__main__":
    main()
