"""Check-in load against 1 and 2 server replicas on one Postgres (issue 8's load run).

For each configuration, interleaved (1, 2, 1, 2, ...): `fedcompute up --replicas N` on a fresh database, one open
task with a large cohort, then DEVICES threads, spread over CLIENT_PROCESSES client processes (each thread its own
connection, so connections spread over the replicas' shared port), call CreateTaskAssignment in a loop for
SECONDS, starting together once every process has connected its callers. Prints check-ins/s, p50/p99 latency
and the status codes seen (UNKNOWN must be 0), per run and as medians with the 2/1 ratio.

    .venv/bin/python bench/checkin_load.py [--devices 64] [--seconds 60] [--pairs 2] [--admin-url URL]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from queue import Queue
from threading import Event

import grpc
from sqlalchemy import create_engine, text

from fedcompute.rpc.channels import open_channel
from fedcompute.v1 import common_pb2, task_assignment_pb2_grpc
from fedcompute.v1 import task_assignment_pb2 as ta

CLI = [sys.executable, "-m", "fedcompute.cli"]
CLIENT_PROCESSES = 2  # the callers are split over this many client processes
CLIENT_READY_S = 120.0  # how long the client processes may take to start, import and connect their callers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _database(admin_url: str, name: str) -> str:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def _drop(admin_url: str, name: str) -> None:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def run(replicas: int, devices: int, seconds: float, admin_url: str) -> dict[str, object]:
    with deployment(replicas, admin_url) as (address, _):
        return load(address, devices, seconds)


@contextmanager
def deployment(replicas: int, admin_url: str) -> Iterator[tuple[str, str]]:
    """`fedcompute up --replicas N` on a fresh database with one open task; yields the server address and the
    database's URL."""
    name = f"fedcompute_bench_{os.getpid()}_{replicas}"
    url = _database(admin_url, name)
    work = Path(tempfile.mkdtemp(prefix="fedcompute-load-"))
    port = _free_port()
    env = {**os.environ, "FEDCOMPUTE_KEY_SERVICE_PORT": "0", "FEDCOMPUTE_VERIFIER_PORT": "0",
           "FEDCOMPUTE_LOG_LEVEL": "ERROR", "FEDCOMPUTE_WORKER_THREADS": "32", "FEDCOMPUTE_PLAINTEXT": "true",
           "FEDCOMPUTE_DEVICE_RATE_PER_S": "0"}  # fmt: skip  # one load generator: one address
    up = subprocess.Popen(
        [*CLI, "up", "--workdir", str(work), "--database-url", url, "--port", str(port), "--replicas", str(replicas)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert up.stderr is not None
        line = ""
        while "key services" not in line:
            line = up.stderr.readline()
            if not line and up.poll() is not None:
                raise RuntimeError("fedcompute up exited")
        threading.Thread(target=up.stderr.read, daemon=True).start()
        keys = line.strip().split("key services ", 1)[1].split(", ")
        token = (work / "operator" / "operator-token").read_text().strip()  # the admin token `up` registered
        task_env = {**env, "FEDCOMPUTE_WORKDIR": str(work), "FEDCOMPUTE_KEY_SERVICE_ADDRESSES": json.dumps(keys),
                    "FEDCOMPUTE_OPERATOR_TOKEN": token}  # fmt: skip
        subprocess.run(
            [*CLI, "task", "create", "--server", f"127.0.0.1:{port}", "--population", "load", "--report-goal",
             "1000", "--max-cohort", "1000000", "--rounds", "1"],
            env=task_env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        time.sleep(2)  # the dealer's key ceremony
        yield f"127.0.0.1:{port}", url
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
        _drop(admin_url, name)


@contextmanager
def deployments(*replicas: int, admin_url: str) -> Iterator[list[tuple[str, str]]]:
    """``deployment`` for each count, started at the same time (each ~20 s here, mostly waiting on its children);
    what each yields, in order. If one fails to start, those that did are stopped."""
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(replicas)) as pool:
        managers = [deployment(n, admin_url) for n in replicas]
        entering = [pool.submit(manager.__enter__) for manager in managers]
        for manager, future in zip(managers, entering, strict=True):
            if future.exception() is None:
                stack.push(manager.__exit__)
        yield [future.result() for future in entering]  # raises the first failure, the others stopped on the way out


def assignments(url: str) -> int:
    """How many assignments the deployment on ``url`` has made."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM assignments")).scalar_one())
    finally:
        engine.dispose()


def cpu_ticks() -> tuple[int, int]:
    """This machine's busy and total CPU time so far, in clock ticks (/proc/stat's first line: busy is user, nice,
    system, irq and softirq; idle, iowait and steal, time the hypervisor gave to others, are not; guest time is
    already in user and nice, so it is not counted again)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def process_ticks(pid: int | str = "self") -> int:
    """A process's user and system CPU so far, in clock ticks, its threads' (ended ones too) included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _closed_loop(
    address: str, devices: int, seconds: float, ready: Queue[int], go: Event
) -> tuple[list[float], dict[str, int]]:
    """``devices`` threads of this process, each connected first (untimed); once all are, the process says so on
    ``ready`` and waits for ``go`` (set when every client process is ready), then each calls CreateTaskAssignment
    in a loop for ``seconds``: latencies and codes."""
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    connected = threading.Barrier(devices + 1)
    start = threading.Event()

    def device() -> None:
        stub = task_assignment_pb2_grpc.TaskAssignmentServiceStub(open_channel(address, own_connection=True))
        request = ta.CreateTaskAssignmentRequest(
            population_name="load", client_version=common_pb2.ClientVersion(version_code="1.0.0")
        )
        with contextlib.suppress(grpc.RpcError):
            stub.CreateTaskAssignment(request, timeout=30)  # connect
        connected.wait()
        start.wait()
        stop = time.monotonic() + seconds
        mine: list[float] = []
        seen: Counter[str] = Counter()
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                stub.CreateTaskAssignment(request, timeout=30)
                seen["OK"] += 1
            except grpc.RpcError as exc:
                seen[exc.code().name] += 1
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            codes.update(seen)

    threads = [threading.Thread(target=device) for _ in range(devices)]
    for t in threads:
        t.start()
    connected.wait()
    ready.put(devices)
    go.wait()
    start.set()
    for t in threads:
        t.join()
    return latencies, dict(codes)


class Callers:
    """The client processes of the closed loops (``CLIENT_PROCESSES``, spawned once and kept for every ``load``: a
    fresh pair per sample cost ~11 s each here, starting, importing and connecting, for a 5 s sample)."""

    def __init__(self, processes: int = CLIENT_PROCESSES) -> None:
        self.processes = processes
        context = multiprocessing.get_context("spawn")
        self._manager = context.Manager()
        self._pool = ProcessPoolExecutor(processes, mp_context=context)

    def close(self) -> None:
        self._pool.shutdown()
        self._manager.shutdown()

    def __enter__(self) -> Callers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self, address: str, devices: int, seconds: float) -> dict[str, object]:
        """The closed loop, its ``devices`` callers spread over the client processes (one Python process's GIL
        caps its gRPC calls near what one replica serves, so one client process cannot show a second replica),
        started together once every process has connected all its callers (each caller connects afresh); also
        how busy the whole machine's CPUs were meanwhile (1.0: every core, all the time)."""
        processes = self.processes
        share = [devices // processes + (1 if i < devices % processes else 0) for i in range(processes)]
        ready, go = self._manager.Queue(), self._manager.Event()
        pending = self._pool.map(_closed_loop, [address] * processes, share, [seconds] * processes,
                                 [ready] * processes, [go] * processes)  # fmt: skip
        for _ in range(processes):
            ready.get(timeout=CLIENT_READY_S)
        busy, total = cpu_ticks()
        go.set()
        time.sleep(seconds)
        busy_after, total_after = cpu_ticks()
        runs = list(pending)
        ordered = sorted(latency for latencies, _ in runs for latency in latencies)
        codes: Counter[str] = Counter()
        for _, seen in runs:
            codes.update(seen)
        return {
            "checkins_per_s": round(codes["OK"] / seconds, 1),
            "p50_ms": round(ordered[len(ordered) // 2] * 1000, 1),
            "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 1),
            "codes": dict(codes),
            "machine_cpu_busy": round((busy_after - busy) / max(1, total_after - total), 3),
        }


def load(address: str, devices: int, seconds: float, processes: int = CLIENT_PROCESSES) -> dict[str, object]:
    """One closed loop from client processes of its own (``Callers.load``)."""
    with Callers(processes) as callers:
        return callers.load(address, devices, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("FEDCOMPUTE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    results: dict[int, list[dict[str, object]]] = {1: [], 2: []}
    for pair in range(args.pairs):
        for replicas in (1, 2):
            result = run(replicas, args.devices, args.seconds, args.admin_url)
            results[replicas].append(result)
            print(f"pair {pair + 1}, {replicas} replica(s): {json.dumps(result)}", flush=True)
    medians = {
        n: {k: statistics.median(float(r[k]) for r in runs) for k in ("checkins_per_s", "p50_ms", "p99_ms")}  # type: ignore[arg-type]
        for n, runs in results.items()
    }
    spread = {n: [r["checkins_per_s"] for r in runs] for n, runs in results.items()}
    ratio = round(medians[2]["checkins_per_s"] / medians[1]["checkins_per_s"], 2)
    print(json.dumps({"medians": medians, "checkins_per_s_runs": spread, "ratio_2_over_1": ratio}))


if __name__ == "__main__":
    main()
