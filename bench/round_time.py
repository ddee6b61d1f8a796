"""A whole round over real gRPC: N simulated devices with a pre-computed bench-1m update, encryption and DP on.

An in-process suite (SQLite, three key services, verifier, launcher and its measured aggregator worker process,
dealer, model updater), as `fedcompute up` runs it, minus TLS and metrics. Per sample: the operator creates a task
(bench-1m, one round, report goal = max cohort = N, DP with C = 1 and z = 1.000, 1.001, ..., one per sample; an
untimed 10-device round first) through `Suite.create_task`; once the dealer's key ceremony has made the population's
key, the load generator's devices (16 threads) each check in, seal the same pre-computed update to the assignment
(HPKE), report and upload it; the time ends when the task is COMPLETED with the next model version published. Full
mode: 3 rounds of 100 devices, then one of 1,000 (client deadlines raised to 300 s for its 4.5 GB job stream). No
training, no model download: servers measured; the devices run in the load generator process on the same 2 cores.
The limit, where `make flower` has made `.venv-flower`: the same round in Flower 1.42's simulation engine (no
network, encryption or DP; bench/flower_round.py, a process of its own per sample), interleaved with the 100-device
rounds (ours, Flower's, ours, ...); the target is 1/5 of it. Without that environment the limit column is the
issue's measurement of it (16 s on this machine), a constant. The 1,000-device round has no limit (the issue sets
none, and Flower's engine would take minutes). Each sample also records the whole machine's busy CPU over it
(core-seconds, /proc/stat), ours and each Flower round's: on a machine of k cores a round needing C core-seconds
takes at least C / k seconds, however its work is overlapped (the row "CPU floor", against the same limit); and, of
ours, the suite's process's and the load generator's (the devices') share.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.checkin_load import cpu_ticks, process_ticks
from bench.common import LoadGenerator, Mode, Result, create_task, suite_settings
from fedcompute.clients.typed import TaskManagementClient
from fedcompute.core import checkpoints
from fedcompute.core.memory import freeze_startup_heap, refreeze_after_imports
from fedcompute.core.secrets import operator_token
from fedcompute.rpc.channels import channel_for
from fedcompute.suite import Suite, start_suite
from fedcompute.v1 import task_management_pb2 as tm

FLOWER_REFERENCE_S = 16.0  # the issue's measurement of Flower 1.42's simulation engine, where it is not run here
FLOWER_PYTHON = Path(__file__).resolve().parent.parent / ".venv-flower" / "bin" / "python"  # `make flower`
FLOWER_READY = FLOWER_PYTHON.with_name(".installed")  # what `make flower` leaves once flwr is installed
TARGET_FRACTION = 0.2  # of Flower's time for the same round
FLOWER_ROUNDS = 2  # per Flower sample: its first round, then one with its actors up (~15 + 5 s for 100 clients)
CONCURRENCY = 16
LARGE = 1000  # one round of this many devices in full mode (4.5 GB of uploads)
WARM_UP = 10  # devices in the untimed first round
CPU_NOTES = ("the machine's busy CPU over create->published (/proc/stat; every process: servers, worker, devices); "
             "core-s / cores is the least the round can take on this machine however it is scheduled")  # fmt: skip

CORES = os.cpu_count() or 1
FLOOR_NOTES = ("the round's busy core-s / this machine's cores: the least it could take here with every core busy and "
               "nothing waiting; while its ratio is above the target, no overlap reaches the target on this machine, "
               "only less CPU does")  # fmt: skip

SPLIT_NOTES = ("the busy CPU's split: the suite's process (servers, key services, verifier, launcher) and the load "
               "generator's (the devices sealing, hashing and sending); the rest of it is the aggregator worker's, "
               "the kernel's and other processes'")  # fmt: skip


def run(mode: Mode, load: LoadGenerator) -> list[Result]:
    sizes = [(20, 1)] if mode.quick else [(100, mode.pairs), (LARGE, 1)]  # (devices, rounds)
    with tempfile.TemporaryDirectory(prefix="fedcompute-bench-") as tmp:
        payload = Path(tmp) / "update.safetensors"
        weights = checkpoints.initial_weights("bench-1m", seed=0)
        payload.write_bytes(checkpoints.encode({k: torch.full_like(v, 1e-4) for k, v in weights.items()},
                                               {"num_examples": 10}))  # fmt: skip
        # a 1,000-device job streams 4.5 GB to the worker: longer client deadlines than the 30 s default
        # the production poll interval (1 s): the worker's claim waits on the server (a long poll the closing upload
        # wakes), the model updater and the dealer are poked by the server in this process; polling at the
        # benchmarks' 50 ms instead would cost the server a fifth of a core while the devices are served
        suite = start_suite(suite_settings(Path(tmp) / "w", "", rpc_timeout_s=300.0, poll_interval_s=1.0))
        freeze_startup_heap()  # as `serve` and `up` do once started (core/memory.py)
        try:
            z = iter(1.0 + 0.001 * i for i in range(100))  # each sample a DP configuration of its own, see _round
            # untimed: the process's first task pays for imports, the accountant's first run and a full garbage
            # collection of what they left (~5 s in a fresh process, measured), which no later round pays again
            _round(suite, load, "warm-up", WARM_UP, payload, next(z))
            refreeze_after_imports()  # what the warm-up imported, as `serve` and `up` freeze it (core/memory.py)
            shapes = {name: list(t.shape) for name, t in weights.items()}
            rounds: dict[int, list[dict[str, float]]] = {}
            flower: dict[int, list[dict[str, Any]]] = {}
            for devices, k in sizes:
                for i in range(k):  # ours, Flower's, ours, ... where Flower is installed (not for the large round)
                    sample = _round(suite, load, f"{devices}-{i}", devices, payload, next(z))
                    rounds.setdefault(devices, []).append(sample)
                    if devices != LARGE and FLOWER_READY.exists():
                        flower.setdefault(devices, []).append(flower_round(devices, shapes))
        finally:
            suite.stop(grace=0)
    if not FLOWER_READY.exists():
        print(f"    no {FLOWER_READY} (make flower): the limit is the issue's Flower figure, {FLOWER_REFERENCE_S:g} s")
    results = []
    for devices, samples in rounds.items():
        runs = flower.get(devices, [])
        first, warm = [r["rounds_s"][0] for r in runs], [x for r in runs for x in r["rounds_s"][1:]]
        if first:
            limit: list[float] | None = first
            about = "the limit Flower 1.42's simulation's first round, measured interleaved (bench/flower_round.py)"
        elif devices != LARGE:
            limit, about = [FLOWER_REFERENCE_S], f"the limit the issue's Flower reference ({FLOWER_REFERENCE_S:g} s)"
        else:
            limit, about = None, "no limit"
        target = f"; target ratio <= {TARGET_FRACTION}" if limit else ""
        notes = f"{devices} devices x {len(samples)} round(s), bench-1m, HPKE + DP, SQLite, over gRPC; {about}{target}"
        extra = {"flower": runs, "flower_reference_s": FLOWER_REFERENCE_S, "target_ratio": TARGET_FRACTION,
                 "rounds": samples}  # fmt: skip
        name, ours = f"round {devices} devices", [r["total_s"] for r in samples]
        results += [
            Result(name, "create->published", "s", ours, limit, lower_is_better=True,
                   notes=notes, extra=extra),
            Result(name, "check-in->published", "s", [r["from_first_checkin_s"] for r in samples], limit,
                   lower_is_better=True, notes=notes),
            Result(name, "devices' turns", "s", [r["devices_s"] for r in samples], notes=notes),
            Result(name, "uploads->published", "s", [r["aggregate_publish_s"] for r in samples], notes=notes),
            Result(name, "CPU busy", "core-s", [r["cpu_core_s"] for r in samples], notes=CPU_NOTES),
            Result(name, "CPU floor", "s", [r["cpu_core_s"] / CORES for r in samples], limit,
                   lower_is_better=True, notes=f"{FLOOR_NOTES}{target}"),
            Result(name, "CPU busy", "fraction", [r["machine_cpu_busy"] for r in samples], notes=CPU_NOTES),
            Result(name, "CPU servers", "core-s", [r["servers_cpu_core_s"] for r in samples], notes=SPLIT_NOTES),
            Result(name, "CPU devices", "core-s", [r["devices_cpu_core_s"] for r in samples], notes=SPLIT_NOTES),
        ]  # fmt: skip
        if warm:  # Flower's later rounds, its actors up: the same round without the start-up the 16 s holds
            warm_notes = "the same rounds against Flower's next round in the same simulation"
            warm_cpu = [x for r in runs for x in r["cpu_core_s"][1:]]
            results += [
                Result(f"round {devices} vs Flower warm", "create->published", "s", ours, warm,
                       lower_is_better=True, notes=warm_notes),
                Result(f"round {devices} vs Flower warm", "CPU busy", "core-s", [r["cpu_core_s"] for r in samples],
                       warm_cpu, lower_is_better=True, notes=f"{warm_notes}; {CPU_NOTES}"),
            ]  # fmt: skip
    return results


def flower_round(devices: int, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """One sample of the limit: Flower's simulation of the same round in `.venv-flower` (bench/flower_round.py),
    ``FLOWER_ROUNDS`` rounds: the first (its Ray actors started in it, as in the issue's reference), then warm."""
    done = subprocess.run(
        [str(FLOWER_PYTHON), str(Path(__file__).with_name("flower_round.py")), str(devices), json.dumps(shapes),
         str(FLOWER_ROUNDS)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"Flower's round failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    timed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return timed


def _round(
    suite: Suite, load: LoadGenerator, index: str, devices: int, payload: Path, z: float = 1.0
) -> dict[str, float]:
    """One sample. ``z``: its noise multiplier, different in every sample (1.000, 1.001, ...) so that no sample's
    ε is served by the process's memo of an earlier one (``core.privacy.epsilon``): each pays for its own, once at
    create (the operator's check; the server's check and the publish of its one round find it in the memo)."""
    population = f"bench-round-{index}"
    spec = tm.TaskSpec(
        population_name=population, model_architecture="bench-1m", rounds=1, report_goal=devices,
        max_cohort=devices,
        hyperparameters=tm.TrainingHyperparameters(local_epochs=1, batch_size=16, learning_rate=0.1),
        dp=tm.DpConfig(enabled=True, target_epsilon=50.0, target_delta=1e-5, assumed_population_size=10 * devices,
                       noise_multiplier=z, l2_clip_norm=1.0),
    )  # fmt: skip
    operators = TaskManagementClient(
        channel_for(suite.settings, suite.server_address), 20.0, operator_token(suite.settings)
    )
    job_done = threading.Event()
    suite.server.job_succeeded.add(job_done.set)  # this process's server took a job's result (one job a round)
    busy, total = cpu_ticks()
    servers, devices_cpu = process_ticks(), process_ticks(load.pid)
    began = time.time()
    task = create_task(suite, spec)
    keyed = time.time()
    turns = load.run(kind="round", address=suite.server_address, population=population, devices=devices,
                     concurrency=CONCURRENCY, payload_path=str(payload))  # fmt: skip
    uploaded = time.time()
    if turns["uploaded"] != devices:
        raise RuntimeError(f"only {turns['uploaded']} of {devices} devices got an assignment")
    deadline = time.monotonic() + 300
    while (current := operators.get_task(tm.GetTaskRequest(task_id=task.task_id)).task).status == tm.TASK_STATUS_OPEN:
        if time.monotonic() > deadline:
            raise RuntimeError("the round did not publish within 300 s")
        # GetTask every 20 ms took a fifth of the server's samples while the worker aggregated (~4 ms each in the
        # server's log): until the job's result is in, ask once a second (a failed job never signals), then 20 ms
        if not job_done.is_set():
            job_done.wait(1.0)
        else:
            time.sleep(0.02)
    published = time.time()
    busy_after, total_after = cpu_ticks()
    servers, devices_cpu = process_ticks() - servers, process_ticks(load.pid) - devices_cpu
    tick = os.sysconf("SC_CLK_TCK")
    if current.status != tm.TASK_STATUS_COMPLETED or current.latest_model_version <= task.latest_model_version:
        raise RuntimeError(
            f"the round ended {tm.TaskStatus.Name(current.status)}, version {current.latest_model_version}"
        )
    return {
        "total_s": published - began,
        "create_and_key_s": keyed - began,
        "from_first_checkin_s": published - float(turns["first_checkin_unix"]),
        "devices_s": float(turns["devices_s"]),
        "aggregate_publish_s": published - uploaded,
        "model_version": current.latest_model_version,
        # the whole machine's busy CPU over the sample (servers, worker, devices): core-seconds
        "cpu_core_s": (busy_after - busy) / tick,
        # of which: this process (the servers, key services, verifier, launcher; not the worker, a process of its
        # own) and the load generator (the devices: sealing, hashing and sending their updates); the rest is the
        # aggregator worker's, the kernel's and whatever else ran
        "servers_cpu_core_s": servers / tick,
        "devices_cpu_core_s": devices_cpu / tick,
        "machine_cpu_busy": round((busy_after - busy) / max(1, total_after - total), 3),
    }
