"""How soon a client reaches a server again after an outage: our channels against gRPC's default backoff.

    .venv/bin/python -m bench.reconnect [--outage SECONDS] [--samples N]

Not part of `make bench` (each sample waits out its outage). Per sample: a port with nothing on it, two channels
to it opened at the same moment, one from `rpc.channels.open_channel` (RECONNECT_BACKOFF) and one with gRPC's
defaults (both with a subchannel of their own), each probed with a health Check every 0.1 s from its own thread;
after ``--outage`` seconds a server starts on the port; the figure is, for each channel, the seconds from the
server serving to that channel's first OK. Both sides see the same outage in the same run, so no drift of the
machine favours either.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedcompute.rpc.channels import open_channel

PROBE_EVERY_S = 0.1


def _late_by(channel: grpc.Channel, up_at: list[float], out: list[float]) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            if up_at:
                out.append(time.monotonic() - up_at[0])
                return
        except grpc.RpcError:
            pass
        time.sleep(PROBE_EVERY_S)


def sample(outage_s: float) -> tuple[float, float]:
    """(ours, gRPC's default): seconds from the server serving to each channel's first OK."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    address = f"127.0.0.1:{port}"
    ours = open_channel(address, own_connection=True)
    default = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    up_at: list[float] = []
    late: dict[str, list[float]] = {"ours": [], "default": []}
    probes = [
        threading.Thread(target=_late_by, args=(channel, up_at, late[name]), daemon=True)
        for name, channel in (("ours", ours), ("default", default))
    ]
    for probe in probes:
        probe.start()
    time.sleep(outage_s)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(address)
    server.start()
    up_at.append(time.monotonic())
    for probe in probes:
        probe.join(timeout=300)
    server.stop(0)
    ours.close()
    default.close()
    return late["ours"][0], late["default"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the server is down")
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()
    results = [sample(args.outage) for _ in range(args.samples)]
    ours, default = [r[0] for r in results], [r[1] for r in results]
    for name, values in (("ours (0.25 s, max 5 s)", ours), ("gRPC default (1 s, max 120 s)", default)):
        print(f"{name:32} late by median {statistics.median(values):6.2f} s [{min(values):.2f}-{max(values):.2f}]")
    print(f"outage {args.outage:.0f} s, {args.samples} samples; ratio ours/default "
          f"{statistics.median(ours) / statistics.median(default):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
