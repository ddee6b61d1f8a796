"""Check-ins/s with 1 and 2 server replicas on one Postgres: bench/checkin_load.py's run, interleaved (1, 2, ...).

Both deployments run side by side for the whole benchmark, started together (`fedcompute up --replicas N`, each
its own processes, SO_REUSEPORT on one port, its own fresh Postgres database, one open task); the samples alternate
between them: 64 callers (threads of two client processes, started once, each caller with a connection of its own
made afresh for each sample, as separate devices have, so that the kernel spreads them over the replicas' shared
port) calling CreateTaskAssignment in a closed loop. One client process is not enough: its GIL caps its calls near
what one replica serves, and gRPC's default shares one connection per address in a process, which lands on one
replica. The idle deployment's polling loops still run during the other's sample. The "limit" here is one replica:
the ratio is the scaling 2/1. Each sample also records how busy the machine's CPUs were (/proc/stat): a second
replica can only add throughput where one left cores idle.

The same again with h2load as the 64 callers (bench/h2load.py), where it is installed: the Python callers spend
~0.25 ms of CPU per call, half a core of the two at these rates, which a fleet's devices spend on their own
hardware. Its check-in samples must have made one assignment per call answered (counted in the database: up to
one more per caller, for calls in flight when it stopped), or the benchmark fails. On the one-replica deployment,
h2load also calls the health Check (the echo of bench/checkin.py), each answer's message bytes counted: the
check-in against the echo of the same server with a native caller.
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2

from bench import checkin_load, h2load
from bench.common import ADMIN_URL, LoadGenerator, Mode, Result, interleave
from bench.loadgen import checkin_request

CALLERS = 64
CHECKIN = "/fedcompute.v1.TaskAssignmentService/CreateTaskAssignment"
ECHO = "/grpc.health.v1.Health/Check"


def run(mode: Mode, load: LoadGenerator) -> list[Result]:
    seconds = 2.0 if mode.quick else 5.0
    with checkin_load.deployments(2, 1, admin_url=ADMIN_URL) as (two_at, one_at), checkin_load.Callers() as callers:
        callers.load(two_at[0], CALLERS, 1.0)  # the servers' connections and caches: untimed
        callers.load(one_at[0], CALLERS, 1.0)
        sides = [lambda: callers.load(two_at[0], CALLERS, seconds),
                 lambda: callers.load(one_at[0], CALLERS, seconds)]  # fmt: skip
        if h2load.H2LOAD:
            sides += [lambda: _checkins(two_at, seconds), lambda: _checkins(one_at, seconds),
                      lambda: _echoes(one_at[0], seconds)]  # fmt: skip
        samples = interleave(mode.pairs, *sides)
    notes = f"`fedcompute up --replicas 2` vs `--replicas 1` on Postgres, {CALLERS} callers, {seconds:.0f} s samples"
    two, one = samples[:2]
    codes = {"two": [r["codes"] for r in two], "one": [r["codes"] for r in one]}
    results = [
        Result("checkin 2 vs 1 replica", "calls/s", "calls/s", [float(r["checkins_per_s"]) for r in two],
               [float(r["checkins_per_s"]) for r in one], notes=notes, extra={"codes": codes}),
        *_rows("checkin 2 vs 1 replica", two, one, notes, busy=True),
    ]  # fmt: skip
    if not h2load.H2LOAD:
        print(f"    h2load not found: its rows are left out ({h2load.INSTALL})")
        return results
    two_h2, one_h2, echo = samples[2:]
    native = f"{notes}, the callers h2load's (bench/h2load.py)"
    return [
        *results,
        Result("checkin 2 vs 1, h2load", "calls/s", "calls/s", [r["per_s"] for r in two_h2],
               [r["per_s"] for r in one_h2], notes=native),
        *_rows("checkin 2 vs 1, h2load", two_h2, one_h2, native, busy=True),
        Result("checkin vs echo, h2load", "calls/s", "calls/s", [r["per_s"] for r in one_h2],
               [r["per_s"] for r in echo], notes=f"1 replica: CreateTaskAssignment vs health Check, {native}"),
        *_rows("checkin vs echo, h2load", one_h2, echo, f"1 replica: CreateTaskAssignment vs health Check, {native}"),
    ]  # fmt: skip


def _rows(
    name: str, product: list[dict[str, Any]], limit: list[dict[str, Any]], notes: str, busy: bool = False
) -> list[Result]:
    """The p99 row, and with ``busy`` the CPU-busy row, of two lists of samples."""
    keys = ["p99_ms", "machine_cpu_busy"] if busy else ["p99_ms"]
    return [
        Result(name, metric, unit, [float(r[key]) for r in product], [float(r[key]) for r in limit],
               lower_is_better=True, notes=notes)
        for key, metric, unit in zip(keys, ["p99", "CPU busy"], ["ms", "fraction"], strict=False)
    ]  # fmt: skip


def _checkins(deployment: tuple[str, str], seconds: float) -> dict[str, Any]:
    address, url = deployment
    made = checkin_load.assignments(url)
    busy, total = checkin_load.cpu_ticks()
    result = h2load.closed_loop(address, CHECKIN, checkin_request("load").SerializeToString(), CALLERS, seconds)
    busy_after, total_after = checkin_load.cpu_ticks()
    made = checkin_load.assignments(url) - made
    if result["not_200"] or not result["calls"] <= made <= result["calls"] + CALLERS:
        raise RuntimeError(
            f"h2load: {result['calls']} check-ins answered, {result['not_200']} not HTTP 200, {made} assignments "
            "made: some check-ins failed"
        )
    return {**result, "machine_cpu_busy": round((busy_after - busy) / max(1, total_after - total), 3)}


def _echoes(address: str, seconds: float) -> dict[str, Any]:
    result = h2load.closed_loop(address, ECHO, health_pb2.HealthCheckRequest().SerializeToString(), CALLERS, seconds)
    each = 5 + len(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString())
    if result["not_200"] or not each * result["calls"] <= result["data_bytes"] <= each * (result["calls"] + CALLERS):
        raise RuntimeError(
            f"h2load: {result['calls']} health checks answered, {result['not_200']} not HTTP 200, "
            f"{result['data_bytes']} bytes of messages ({each} each when SERVING): some checks failed"
        )
    return result
