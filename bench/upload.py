"""Upload of 4 MiB envelopes, 16 at a time: UploadService.Write of the real server against a raw sink.

Product: an in-process suite on SQLite (no aggregator); each upload is a real device's (`clients/device.upload`): a
client stream of WriteRequests from offset 0 (the server's chunk size, 1 MiB): the server reads the upload's state
(no write), takes the upload's writer lock, appends the chunks to a staging file hashing them as they arrive, fsyncs
it, checks the hash and the envelope header's binding, moves the file into the blob store and, in one durable
transaction, writes the upload complete, marks the assignment uploaded and counts the round. Check-ins, reports,
sealing and hashing each envelope (the device declares its sha256) are done first and are not timed, as the sink's
bytes are made before its clock starts. Limit: a trivial grpcio server in the same process (same thread pool size,
no interceptor) whose one client-streaming method consumes the same WriteRequest messages, of the same chunk size,
and does nothing with them. Both driven from the load generator process; MB/s = envelope bytes / wall time of the
batch; the report's extra field gives the devices' own CPU per upload.

A second limit, a row of its own: the least a server that keeps what it acknowledges must do with the same
messages, on the same disk. The durable sink appends each chunk to a new file while hashing it (sha256), past the
page cache as the product does (core/files.py UncachedAppender), fsyncs the file, renames it into place, fsyncs
the directory and answers; its files stay until the benchmark ends, as the product's blobs do. No database, no
check of the hash or header, no locks. The sides alternate: product, raw sink, durable sink, disk alone (below).
The durable sink against the raw sink is a row as well: no durable server reaches a higher ratio here (on
2026-12-03 the disk alone ran at 1.5-1.6x the raw sink and the durable sink at 0.53-0.55 of it: there the durable
sink's hash and writes, on two cores shared with the callers, bound its ratio, not the disk's bandwidth).
(The page cache is most of the cost of writing here: a sink that kept its files' pages cached ran at 270-300 MB/s,
19-22 ms of server CPU per upload, most of it the kernel's page-cache writes into pages it had to find and clear;
one that deleted each file, or dropped its pages once fsynced, let the next file's writes reuse them. The product
did the latter from 2026-11-30: 270 -> 420 MB/s here; since 2026-12-01 it writes past the cache, O_DIRECT: another
+10 %.)

A fourth side, the disk alone: the same number of 4 MiB files, 16 threads at a time, each written from memory in
1 MiB chunks past the page cache, fsynced, renamed into place and the directory fsynced, exactly as the durable sink
stores them, with no gRPC and no hash. No server that acknowledges an upload only once it is on the disk can take
uploads faster than this; its row gives it against the raw sink, the ceiling of the product's ratio on this disk.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from bench.common import LoadGenerator, Mode, Result, create_task, interleave, suite_settings
from fedcompute.core.files import UncachedAppender, replace_durably
from fedcompute.core.memory import freeze_startup_heap, refreeze_after_imports
from fedcompute.suite import start_suite
from fedcompute.v1 import task_management_pb2 as tm
from fedcompute.v1 import upload_pb2

POPULATION = "bench-upload"
SIZE = 4 * 1024 * 1024
CONCURRENCY = 16


def store_durably(directory: Path, name: str, chunks: Iterator[bytes | memoryview]) -> int:
    """What the durable sink does with one upload's bytes (and the disk-alone side with its files): appended past
    the page cache, fsynced, renamed into place, the directory fsynced; the file kept. Returns its size."""
    size = 0
    with UncachedAppender(directory / f"{name}.part", 0) as out:  # past the page cache, as the product's
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
        out.sync()
    replace_durably(directory / f"{name}.part", directory / name)  # rename, then fsync the directory
    return size


def disk_alone(directory: Path, concurrency: int, count: int, size: int, chunk: int) -> dict[str, float]:
    """The disk-alone side (see the module): ``count`` files of ``size`` bytes, ``concurrency`` at a time."""
    data = memoryview(os.urandom(size))
    sample = directory / f"disk-{time.monotonic_ns()}"
    sample.mkdir()

    def one(i: int) -> int:
        return store_durably(sample, f"{i}", (data[o : o + chunk] for o in range(0, size, chunk)))

    began = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        written = sum(pool.map(one, range(count)))
    return {"mb_per_s": written / (time.perf_counter() - began) / 1e6}


def start_sink(threads: int, max_message_bytes: int, durable_in: Path | None = None) -> tuple[grpc.Server, int]:
    """The raw sink; with ``durable_in``, the durable sink writing there (see the module)."""
    names = itertools.count()

    def discard(requests: Iterator[upload_pb2.WriteRequest]) -> int:
        return sum(len(r.data) for r in requests)

    def keep(requests: Iterator[upload_pb2.WriteRequest]) -> int:
        assert durable_in is not None
        digest = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for r in requests:
                digest.update(r.data)
                yield r.data

        # named by arrival: the bench's envelopes are alike, so their hashes would not make names of their own
        return store_durably(durable_in, f"{next(names)}", hashed())

    receive = keep if durable_in is not None else discard

    def write(requests: Iterator[upload_pb2.WriteRequest], context: grpc.ServicerContext) -> upload_pb2.WriteResponse:
        size = receive(requests)
        return upload_pb2.WriteResponse(committed_size=size, complete=True)

    handler = grpc.stream_unary_rpc_method_handler(
        write, upload_pb2.WriteRequest.FromString, upload_pb2.WriteResponse.SerializeToString
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        handlers=[grpc.method_handlers_generic_handler("bench.Sink", {"Write": handler})],
        options=[("grpc.max_receive_message_length", max_message_bytes)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def run(mode: Mode, load: LoadGenerator) -> list[Result]:
    count = CONCURRENCY if mode.quick else 4 * CONCURRENCY
    with tempfile.TemporaryDirectory(prefix="fedcompute-bench-") as tmp:
        suite = start_suite(suite_settings(Path(tmp) / "w", "", poll_interval_s=1.0), aggregator=False)  # as checkin
        freeze_startup_heap()  # as `serve` and `up` do once started (core/memory.py)
        sink, sink_port = start_sink(suite.settings.worker_threads, suite.settings.max_message_bytes)
        (Path(tmp) / "durable").mkdir()
        durable, durable_port = start_sink(
            suite.settings.worker_threads, suite.settings.max_message_bytes, Path(tmp) / "durable"
        )
        try:
            spec = tm.TaskSpec(
                population_name=POPULATION, model_architecture="digits-linear-v1", rounds=1,
                report_goal=40_000, max_cohort=1_000_000,
                hyperparameters=tm.TrainingHyperparameters(local_epochs=1, batch_size=16, learning_rate=0.1),
            )  # fmt: skip
            create_task(suite, spec)
            refreeze_after_imports()  # the operator's plan export just ran here: as `serve` freezes it (core/memory.py)
            address = suite.server_address
            chunk = suite.settings.chunk_size_bytes
            product, limit, floor, disk = interleave(
                mode.pairs,
                lambda: load.run(kind="upload", address=address, population=POPULATION, concurrency=CONCURRENCY,
                                 count=count, size=SIZE),
                lambda: load.run(kind="sink", address=f"127.0.0.1:{sink_port}", concurrency=CONCURRENCY,
                                 count=count, size=SIZE, chunk=chunk),
                lambda: load.run(kind="sink", address=f"127.0.0.1:{durable_port}", concurrency=CONCURRENCY,
                                 count=count, size=SIZE, chunk=chunk),
                lambda: disk_alone(Path(tmp), CONCURRENCY, count, SIZE, chunk),
            )  # fmt: skip
        finally:
            durable.stop(0)
            sink.stop(0)
            suite.stop(grace=0)
    notes = (
        f"{count} x 4 MiB envelopes per sample, {CONCURRENCY} concurrent, {chunk // 1024} KiB chunks; "
        "UploadService.Write (SQLite, fsync) vs a raw grpcio client-streaming sink"
    )
    durable_notes = (
        f"the same uploads vs a durable sink: hash, write past the page cache, fsync, rename, fsync the directory, "
        f"keep the file ({notes})"
    )
    return [
        Result("upload 4MiB x16", "throughput", "MB/s", [p["mb_per_s"] for p in product],
               [b["mb_per_s"] for b in limit], notes=notes,
               extra={"devices_cpu_ms_per_upload": {
                   "product": [1000 * p["client_cpu_s"] / count for p in product],
                   "limit": [1000 * b["client_cpu_s"] / count for b in limit]}}),
        Result("upload vs durable sink", "throughput", "MB/s", [p["mb_per_s"] for p in product],
               [b["mb_per_s"] for b in floor], notes=durable_notes),
        Result("disk alone vs raw sink", "throughput", "MB/s", [d["mb_per_s"] for d in disk],
               [b["mb_per_s"] for b in limit],
               notes=f"the same files written durably from memory, no gRPC, no hash, {CONCURRENCY} at a time, "
                     "against the raw sink: the disk's own ceiling (the row below is the machine's)"),
        Result("durable sink vs raw sink", "throughput", "MB/s", [f["mb_per_s"] for f in floor],
               [b["mb_per_s"] for b in limit],
               notes="the least a server that keeps what it acknowledges must do (the durable sink: gRPC, hash, "
                     "write, two flushes) against the raw sink: the ceiling of the product's ratio here, whichever "
                     "of the disk and the machine's CPU and flush latency bounds it"),
    ]  # fmt: skip
