"""The load generator process (started by common.LoadGenerator): plays devices against an address.

Commands, one JSON object a line on stdin; one JSON answer a line on stdout:
  checkin / health  closed loop for `seconds`, `concurrency` callers, each with its own channel and connection
  (every simulated device below has a connection of its own, as separate devices do)
  upload / sink     `count` uploads of `size`-byte envelopes, `concurrency` at a time (prepared first, untimed:
                    sealed and hashed, as the sink's bytes are made before its clock starts)
  round             `devices` whole device turns (check in, seal the pre-computed update, report, upload)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcompute.clients.device import context_of, report_request, upload
from fedcompute.clients.typed import TaskAssignmentClient, UploadClient, encode_write
from fedcompute.core.memory import keep_large_buffers
from fedcompute.keys.envelope import sealed_envelope
from fedcompute.rpc.channels import open_channel
from fedcompute.v1 import common_pb2, upload_pb2
from fedcompute.v1 import task_assignment_pb2 as ta

SINK_METHOD = "/bench.Sink/Write"
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)  # each device its own connection, as open_channel(own_...)


def closed_loop(concurrency: int, seconds: float, make_call: Callable[[], Callable[[], None]]) -> dict[str, Any]:
    """``concurrency`` threads call in a loop until ``seconds`` pass; calls/s, p50/p99 and the codes seen."""
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    stop = [0.0]

    def caller() -> None:
        call = make_call()
        with contextlib.suppress(grpc.RpcError):
            call()  # connect and warm up, untimed
        mine: list[float] = []
        seen: Counter[str] = Counter()
        start.wait()
        while time.perf_counter() < stop[0]:
            began = time.perf_counter()
            try:
                call()
                seen["OK"] += 1
            except grpc.RpcError as exc:
                seen[exc.code().name] += 1
            mine.append(time.perf_counter() - began)
        with lock:
            latencies.extend(mine)
            codes.update(seen)

    threads = [threading.Thread(target=caller) for _ in range(concurrency)]
    for t in threads:
        t.start()
    stop[0] = time.perf_counter() + 3600
    start.wait()
    began = time.perf_counter()
    stop[0] = began + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "per_s": codes["OK"] / elapsed,
        "p50_ms": ordered[len(ordered) // 2] * 1000 if ordered else 0.0,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000 if ordered else 0.0,
        "codes": dict(codes),
    }


def checkin_request(population: str) -> ta.CreateTaskAssignmentRequest:
    return ta.CreateTaskAssignmentRequest(
        population_name=population, client_version=common_pb2.ClientVersion(version_code="1.0.0")
    )


def checkin(address: str, population: str, concurrency: int, seconds: float) -> dict[str, Any]:
    def make() -> Callable[[], None]:
        stub = TaskAssignmentClient(open_channel(address, own_connection=True), 30.0)
        request = checkin_request(population)
        return lambda: stub.create_task_assignment(request) and None

    return closed_loop(concurrency, seconds, make)


def health(address: str, concurrency: int, seconds: float) -> dict[str, Any]:
    def make() -> Callable[[], None]:
        stub = health_pb2_grpc.HealthStub(open_channel(address, own_connection=True))
        request = health_pb2.HealthCheckRequest(service="")
        return lambda: stub.Check(request, timeout=30.0) and None

    return closed_loop(concurrency, seconds, make)


def assign(address: str, population: str) -> ta.TaskAssignment:
    """Check in and report COMPLETED; the assignment, with its upload instruction in ``instruction``."""
    client = TaskAssignmentClient(open_channel(address), 30.0)
    a = client.create_task_assignment(checkin_request(population)).task_assignment
    if not a.assignment_id:
        raise RuntimeError("check-in got no assignment")
    return a


def timed_pool(concurrency: int, jobs: Iterable[Callable[[], int]]) -> dict[str, Any]:
    """Run ``jobs`` (each returns bytes sent) on ``concurrency`` threads; bytes, seconds, MB/s, and this process's
    CPU seconds meanwhile (the devices' own cost, which shares the machine with the server's)."""
    began, cpu, began_unix = time.perf_counter(), time.process_time(), time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        sent = sum(pool.map(lambda job: job(), jobs))
    elapsed = time.perf_counter() - began
    return {
        "bytes": sent, "seconds": elapsed, "mb_per_s": sent / elapsed / 1e6,
        "client_cpu_s": time.process_time() - cpu, "began_unix": began_unix,
    }  # fmt: skip


def upload_product(address: str, population: str, concurrency: int, count: int, size: int) -> dict[str, Any]:
    plaintext = os.urandom(size - 512)  # the envelope adds context, key id and HPKE overhead (~400 bytes)
    client = TaskAssignmentClient(open_channel(address), 30.0)
    prepared = []
    for _ in range(count):  # untimed: check-in, report, seal
        a = assign(address, population)
        instruction = client.report_result(report_request(a, ta.REPORT_RESULT_COMPLETED)).upload_instruction
        envelope = sealed_envelope(plaintext, context_of(a), a.encryption_key.public_key)
        prepared.append((instruction, envelope, hashlib.sha256(envelope).hexdigest()))  # the device's, as the seal
    uploads = [UploadClient(open_channel(address, own_connection=True), 120.0) for _ in range(concurrency)]

    def job(i: int) -> Callable[[], int]:
        instruction, envelope, sha256_hex = prepared[i]
        return lambda: upload(uploads[i % concurrency], instruction, envelope, sha256_hex) and len(envelope)

    result = timed_pool(concurrency, [job(i) for i in range(count)])
    return {**result, "envelope_bytes": len(prepared[0][1]), "chunk_bytes": prepared[0][0].chunk_size_bytes}


def sink(address: str, concurrency: int, count: int, size: int, chunk: int) -> dict[str, Any]:
    data = os.urandom(size)
    channels = [
        grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1), OWN_CONNECTION])
        for _ in range(concurrency)
    ]
    writes = [c.stream_unary(SINK_METHOD, bytes, upload_pb2.WriteResponse.FromString) for c in channels]
    view = memoryview(data)

    def requests() -> Iterator[bytes]:  # encoded as the product's devices encode theirs (clients/typed.py)
        for offset in range(0, size, chunk):
            yield encode_write(offset, view[offset : offset + chunk], offset + chunk >= size)

    def job(i: int) -> Callable[[], int]:
        return lambda: writes[i % concurrency](requests(), timeout=120.0) and size

    return timed_pool(concurrency, [job(i) for i in range(count)])


def round_devices(address: str, population: str, devices: int, concurrency: int, payload_path: str) -> dict[str, Any]:
    """Whole device turns with a pre-computed update (read from ``payload_path``): check in, seal, report, upload."""
    with open(payload_path, "rb") as f:
        payload = f.read()
    channels = [open_channel(address, own_connection=True) for _ in range(concurrency)]  # a device's connection
    assignments = [TaskAssignmentClient(channel, 60.0) for channel in channels]
    uploads = [UploadClient(channel, 120.0) for channel in channels]
    first: list[float] = []

    def turn(i: int) -> int:
        client = assignments[i % concurrency]
        first.append(time.time())
        a = client.create_task_assignment(checkin_request(population)).task_assignment
        if not a.assignment_id:
            return 0
        envelope = sealed_envelope(payload, context_of(a), a.encryption_key.public_key)
        instruction = client.report_result(report_request(a, ta.REPORT_RESULT_COMPLETED)).upload_instruction
        upload(uploads[i % concurrency], instruction, envelope)
        return 1

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = sum(pool.map(turn, range(devices)))
    return {"uploaded": done, "devices_s": time.perf_counter() - began, "first_checkin_unix": min(first)}


COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "checkin": checkin,
    "health": health,
    "upload": upload_product,
    "sink": sink,
    "round": round_devices,
}


def main() -> None:
    keep_large_buffers()  # the devices share the 2 cores with the servers: their allocator's page faults too
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = COMMANDS[command.pop("kind")](**command)
        except Exception as exc:  # reported to the runner, which stops
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
