"""Benchmark: wall time of full federated rounds on the embedded default (prints numbers; asserts nothing).

.venv/bin/python bench/round_throughput.py [--devices 50] [--rounds 3] [--database-url URL]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from fedcompute.clients.demo import DEMO_SETTINGS, run_demo
from fedcompute.core.logs import configure_logging
from fedcompute.core.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    configure_logging(json_lines=False, level=logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="fedcompute-bench-"))
    settings = Settings(**DEMO_SETTINGS, workdir=workdir, database_url=args.database_url)  # type: ignore[arg-type]
    started = time.perf_counter()
    result = run_demo(settings, args.devices, args.rounds, seed=0, timeout_s=1800)
    elapsed = time.perf_counter() - started
    uploads = sum(r.contributions for r in result.rounds)
    print(f"database={result.database} devices={args.devices} rounds={args.rounds}")
    print(f"total_s={elapsed:.1f} per_round_s={elapsed / args.rounds:.2f} contributions={uploads}")
    print(f"final_accuracy={result.final_accuracy:.4f} central_accuracy={result.central_accuracy:.4f}")


if __name__ == "__main__":
    main()
