"""`make bench`: every benchmark, product and limit interleaved; a table on stdout, JSON in bench/out/report.json.

    .venv/bin/python -m bench.run [--quick] [--only NAME ...] [--out PATH] [--aggregator-device cuda]

--quick is a smoke run (under a minute: one pair, 1 s samples, fewer contributions and devices, no
replicas unless named by --only); its numbers are not to be compared.
NAME is one of: checkin, upload, aggregate, round, replicas, keystore. --aggregator-device cuda (or cuda:N) adds
rows to the aggregation benchmark for the worker summing on that device, interleaved with the CPU rows and the same
limit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import statistics
import time
from pathlib import Path

from bench.common import LoadGenerator, Mode, Result, machine
from fedcompute.core.logs import configure_logging
from fedcompute.core.memory import keep_large_buffers

# name -> module with run(mode, load) -> list[Result]
BENCHMARKS = {"checkin": "checkin", "upload": "upload", "aggregate": "aggregate", "round": "round_time",
              "replicas": "replicas", "keystore": "keystore"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "report.json")
    parser.add_argument("--aggregator-device", default="cpu", help="also aggregate on this torch device (cuda:N)")
    args = parser.parse_args()
    configure_logging(json_lines=False, level=logging.ERROR)
    keep_large_buffers()  # this process hosts the suite, as `fedcompute up` would (the load generator sets its own)
    pairs, seconds = (1, 1.0) if args.quick else (3, 3.0)
    mode = Mode(pairs, seconds, quick=args.quick, aggregator_device=args.aggregator_device)
    report: dict[str, object] = {"machine": machine(gpu=mode.aggregator_device != "cpu"),
                                 "mode": "quick" if mode.quick else "full", "pairs": mode.pairs,
                                 "sample_seconds": mode.seconds, "aggregator_device": mode.aggregator_device,
                                 "benchmarks": {}}  # fmt: skip
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with LoadGenerator() as load:
        # --quick leaves out replicas (each sample starts `fedcompute up` twice, ~35 s) unless asked by --only
        names = args.only or [n for n in BENCHMARKS if not (mode.quick and n == "replicas")]
        for name in names:
            began = time.perf_counter()
            results: list[Result] = importlib.import_module(f"bench.{BENCHMARKS[name]}").run(mode, load)
            report["benchmarks"][name] = {  # type: ignore[index]
                "seconds": round(time.perf_counter() - began, 1),
                "results": [r.as_json() for r in results],
            }
            args.out.write_text(json.dumps(report, indent=2))  # what finished so far survives a later failure
            print_table(name, results)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}; {report['mode']} mode, {mode.pairs} pair(s); {report['seconds']} s; {args.out}")


def print_table(name: str, results: list[Result]) -> None:
    print(f"\n== {name}")
    print(f"{'benchmark':<30} {'metric':<16} {'product median [min-max]':>30} {'limit median [min-max]':>30} ratio")
    notes = ""
    for r in results:
        limit = _cell(r.limit) if r.limit is not None else "-"
        ratio = f"{statistics.median(r.product) / statistics.median(r.limit):.3f}" if r.limit else "-"
        print(f"{r.name:<30} {r.metric + ' (' + r.unit + ')':<16} {_cell(r.product):>30} {limit:>30} {ratio}")
        if r.notes and r.notes != notes:
            print(f"    {r.notes}")
        notes = r.notes


def _cell(samples: list[float]) -> str:
    return f"{_num(statistics.median(samples))} [{_num(min(samples))}-{_num(max(samples))}]"


def _num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


if __name__ == "__main__":
    main()
