"""The round benchmark's limit: one round of Flower's simulation engine over the same model, run in a virtual
environment of its own (`make flower`: `.venv-flower`, flwr[simulation] 1.42.0 and its Ray, whose grpcio and
protobuf pins are not ours). This file imports nothing of fedcompute and runs only there.

    .venv-flower/bin/python bench/flower_round.py DEVICES SHAPES_JSON [ROUNDS]

The issue's reference, measured the same way: N virtual clients (Flower SuperNodes on its Ray backend, one CPU
each) whose ClientApp receives the global model and answers a pre-computed update of the same tensors (no
training, as the product's devices upload a pre-computed update); the message-API FedAvg strategy samples all N,
averages their answers by example count and runs no evaluation. No network, encryption or DP. ROUNDS (3) such
rounds, each one call of ``FedAvg.start`` with one round (send, N client runs, receive, average), in one
simulation. Printed as one JSON line: ``rounds_s``, each round's seconds. The first includes the Ray backend
bringing up its actors (measured here: 9.8 s for 2 clients, 15.0 s for 100; later rounds of 100 took 4.4-5.4 s):
the issue's 16 s reference is such a first round. ``run_s``: the whole `run_simulation` call (Ray's start and
stop too), for reference. ``cpu_core_s``: the whole machine's busy CPU during each round (/proc/stat, every
process: Ray's actors and driver, and the benchmark's own process with its idle suite polling once a second), as
the product's rounds are measured.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation


def busy_ticks() -> int:
    """This machine's busy CPU time so far, in clock ticks, as the product's rounds count it
    (bench/checkin_load.py cpu_ticks: user, nice, system, irq and softirq of /proc/stat's first line)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in stat.readline().split()[1:8])
    return user + nice + system + irq + softirq


def main() -> None:
    devices, shapes = int(sys.argv[1]), json.loads(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    update = [np.full(shape, 1e-4, dtype=np.float32) for shape in shapes.values()]
    client, server = ClientApp(), ServerApp()
    timed: dict[str, object] = {}

    @client.train()  # type: ignore[untyped-decorator]
    def train(message: Message, context: Context) -> Message:
        message.content["arrays"].to_numpy_ndarrays()  # the global model, read as a client would
        reply = RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord({"num-examples": 10})})
        return Message(content=reply, reply_to=message)

    @server.main()  # type: ignore[untyped-decorator]
    def rounds(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=devices,
                          min_available_nodes=devices)  # fmt: skip
        initial = ArrayRecord([np.zeros(shape, dtype=np.float32) for shape in shapes.values()])
        seconds, cpu = [], []
        for _ in range(count):
            began, busy = time.perf_counter(), busy_ticks()
            strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
            seconds.append(time.perf_counter() - began)
            cpu.append((busy_ticks() - busy) / os.sysconf("SC_CLK_TCK"))
        timed["rounds_s"], timed["cpu_core_s"] = seconds, cpu

    logging.disable(logging.INFO)  # Flower logs each step at INFO on stderr
    began = time.perf_counter()
    run_simulation(server, client, num_supernodes=devices,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})  # fmt: skip
    timed["run_s"] = time.perf_counter() - began
    if "rounds_s" not in timed:
        raise SystemExit("Flower's ServerApp did not finish its rounds")
    print(json.dumps(timed))


if __name__ == "__main__":
    main()
