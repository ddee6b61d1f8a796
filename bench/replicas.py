"""Check-ins/s with 1 and 2 server replicas on one Postgres: bench/checkin_load.py's run, interleaved (1, 2, ...).

Both deployments run side by side for the whole benchmark (`fedcompute up --replicas N`, each its own processes,
SO_REUSEPORT on one port, its own fresh Postgres database, one open task); the samples alternate between them: 64
callers (threads of two client processes, each caller with a connection of its own, as separate devices have, so
that the kernel spreads them over the replicas' shared port) calling CreateTaskAssignment in a closed loop. One
client process is not enough: its GIL caps its calls near what one replica serves, and gRPC's default shares one
connection per address in a process, which lands on one replica. The idle deployment's polling loops still run
during the other's sample. The "limit" here is one replica: the ratio is the scaling 2/1. Each sample also records
how busy the machine's CPUs were (/proc/stat): a second replica can only add throughput where one left cores idle.
"""

from __future__ import annotations

from bench import checkin_load
from bench.common import ADMIN_URL, LoadGenerator, Mode, Result, interleave

CALLERS = 64


def run(mode: Mode, load: LoadGenerator) -> list[Result]:
    seconds = 2.0 if mode.quick else 5.0
    with checkin_load.deployment(2, ADMIN_URL) as two_at, checkin_load.deployment(1, ADMIN_URL) as one_at:
        checkin_load.load(two_at, CALLERS, 1.0)  # connections, caches: untimed
        checkin_load.load(one_at, CALLERS, 1.0)
        two, one = interleave(
            mode.pairs,
            lambda: checkin_load.load(two_at, CALLERS, seconds),
            lambda: checkin_load.load(one_at, CALLERS, seconds),
        )
    notes = f"`fedcompute up --replicas 2` vs `--replicas 1` on Postgres, {CALLERS} callers, {seconds:.0f} s samples"
    codes = {"two": [r["codes"] for r in two], "one": [r["codes"] for r in one]}
    return [
        Result("checkin 2 vs 1 replica", "calls/s", "calls/s", [float(r["checkins_per_s"]) for r in two],
               [float(r["checkins_per_s"]) for r in one], notes=notes, extra={"codes": codes}),
        Result("checkin 2 vs 1 replica", "p99", "ms", [float(r["p99_ms"]) for r in two],
               [float(r["p99_ms"]) for r in one], lower_is_better=True, notes=notes),
        Result("checkin 2 vs 1 replica", "CPU busy", "fraction", [float(r["machine_cpu_busy"]) for r in two],
               [float(r["machine_cpu_busy"]) for r in one], lower_is_better=True, notes=notes),
    ]  # fmt: skip
