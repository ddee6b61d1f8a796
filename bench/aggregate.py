"""Aggregation of bench-1m contributions in-process: the aggregator's own code against HPKE-open + float64 add.

Product, the loop of `AggregatorWorker.process`: the worker's `Opener` on two threads, three items ahead of the
summing one: per contribution, sha256 of the envelope, its check against the job's input list (in stream order),
then `open_contribution` (scan the envelope,
check its context against the job, HPKE open in place, view the safetensors payload's tensors without a copy after
checking its layout, names, shapes and dtypes against the plan's schema, check finiteness; with DP the update's
float64 norm too), then on the caller `StreamingMean.add` (without DP) or `DpSum.add` (with DP: clip to C by the
norm computed while opening, sum in float64; the release's noise, from ChaCha20 over 1,126,410 coordinates, drawn
on a thread of its own from the first addition on, as the worker does); at the end the release (the mean, or the
noised sum) and `checkpoints.encode` of the result, as the worker does before CompleteJob. Not
included: claiming the job, fetching the key shares from the key services, verifying the access policy, streaming
the envelopes over gRPC (StreamContributions) and sending the result back. Limit, on one thread: parse the
envelope, HPKE-open its ciphertext, view the safetensors data as float32 and add it in place into one float64
array. The envelopes are K distinct sealed updates reused in turn (memory).
With ``--aggregator-device cuda`` (bench.run) the product also runs summing on that device (the worker's
``aggregator_device``): opening stays on the CPU, each update is copied to the device and added there in float64,
DP's norm is the one taken while opening, its noise is drawn on the CPU and added on the device.
Two diagnostic rows (CPU only, interleaved with the rest, no RSS): the product with and without DP minus the hash
of each envelope (its sha256 looked up instead), against the same limit, which hashes nothing: what the worker's
check of its input list costs. A third (CPU only, no RSS): the product with DP over ``ON_DISK`` envelope files
written past the page cache and fsynced, as the server stores uploads and a worker sharing its disk reads them
(`Opener` on its disk pacing), against the disk alone reading the same files (``read_uncached`` on as many threads,
nothing else): how near the disk a round's aggregation runs.
Peak RSS: once per side after the timed samples, each in a fresh process (`python -m bench.aggregate SIDE N`)
that builds the job, then aggregates while /proc/self/statm is sampled every 5 ms; it includes Python, torch and
the 16 envelopes held in memory (`baseline_mib`, its level just before the run).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from bench.common import LoadGenerator, Mode, Result, interleave
from fedcompute.aggregator.contributions import JobContext, Opened
from fedcompute.aggregator.dp import DpParams, DpSum
from fedcompute.aggregator.fedavg import StreamingMean, accumulation_device
from fedcompute.aggregator.noise import ChaChaGaussian, Rehearsed
from fedcompute.aggregator.opener import DISK_THREADS, Hashed, Item, LocalEnvelope, Opener
from fedcompute.clients.typed import StreamedContribution
from fedcompute.core import checkpoints
from fedcompute.core.context import ContributionContext
from fedcompute.core.files import UncachedAppender, read_uncached
from fedcompute.core.memory import keep_large_buffers
from fedcompute.core.telemetry import WorkerMetrics
from fedcompute.keys import hpke
from fedcompute.keys.envelope import sealed_envelope
from fedcompute.v1 import upload_pb2

ARCH = "bench-1m"
DISTINCT = 16


class Job:
    """K sealed bench-1m updates bound to one job's context, and the key that opens them."""

    def __init__(self) -> None:
        weights = checkpoints.initial_weights(ARCH, seed=0)
        self.parameters = sum(t.numel() for t in weights.values())
        self.key = hpke.generate_private_key()
        public = hpke.public_bytes(self.key.public_key())
        self.key_id = hpke.key_id_for(public)
        schema = {k: (tuple(v.shape), v.dtype) for k, v in weights.items()}
        self.context = JobContext("bench", "task", 1, "agg", 1, "p" * 64, "q" * 64, schema)
        generator = torch.Generator().manual_seed(0)
        self.envelopes: list[tuple[bytes, str]] = []
        for i in range(DISTINCT):
            update = {k: torch.randn(v.shape, generator=generator) * 1e-3 for k, v in weights.items()}
            payload = checkpoints.encode(update, {"num_examples": 10})
            assignment = f"a{i:04d}"
            bound = ContributionContext("bench", "task", 1, "agg", assignment, self.key_id, 1, "p" * 64, "q" * 64)
            self.envelopes.append((sealed_envelope(payload, bound, public), assignment))
        # as the worker reads them from the server's stream (views) or blob directory
        self.streamed = [StreamedContribution(a, memoryview(e)) for e, a in self.envelopes]
        self.digests = [hashlib.sha256(e).hexdigest() for e, _ in self.envelopes]
        self.metrics = WorkerMetrics.create(CollectorRegistry())

    def inputs(self, count: int) -> list[tuple[str, str]]:
        """The job's input list for ``count`` items of the stream (the distinct envelopes in turn)."""
        return [(self.envelopes[i % DISTINCT][1], self.digests[i % DISTINCT]) for i in range(count)]

    def keys(self, key_id: str) -> Any:
        assert key_id == self.key_id
        return self.key

    def files(self, directory: Path, count: int) -> list[LocalEnvelope]:
        """``count`` envelope files (the distinct envelopes in turn, each a file of its own), written past the page
        cache and fsynced as the server stores an upload, so reading one goes to the disk."""
        files = []
        for i in range(count):
            envelope, assignment = self.envelopes[i % DISTINCT]
            path = directory / f"envelope-{i}"
            with UncachedAppender(path, 0) as out:
                for start in range(0, len(envelope), 1 << 20):
                    out.write(envelope[start : start + (1 << 20)])
                out.sync()
            files.append(LocalEnvelope(assignment, path, len(envelope)))
        return files


def product(
    job: Job,
    count: int,
    dp: bool,
    device: str = "cpu",
    hashed_too: bool = True,
    files: list[LocalEnvelope] | None = None,
) -> float:
    """Seconds to open and sum ``count`` contributions and release the result, as ``AggregatorWorker.process``
    does: the worker's ``Opener`` (each item hashed, checked in order against the job's input list and opened, on
    two threads, three ahead) while the current one is added (summed on ``device``, the worker's
    ``aggregator_device``; the result is back on the CPU before the clock stops). Without ``hashed_too`` (a
    diagnostic side, not the product) each item's sha256 is looked up, not computed: what the check costs. With
    ``files``: those (``count`` is their number), read from the disk as the worker sharing the server's does."""
    inputs = [(a, digest) for a, digest in job.inputs(count)]
    known = dict(inputs)
    began = time.perf_counter()
    params = DpParams(clip_norm=1.0, noise_multiplier=1.0, expected_clients=count, min_clients=1)
    on = accumulation_device(device)
    mean: DpSum | StreamingMean = DpSum(params, on) if dp else StreamingMean(on)

    def looked_up(item: Item) -> Hashed:
        assert isinstance(item, StreamedContribution)
        return item.assignment_id, item.envelope, known[item.assignment_id]

    opener = Opener(inputs, job.context, job.keys, job.metrics, norms=dp, digest=None if hashed_too else looked_up)
    items: Any = files if files is not None else (job.streamed[i % DISTINCT] for i in range(count))
    noise: Rehearsed | None = None
    for contribution in opener.outcomes(items):
        if not isinstance(contribution, Opened):
            raise RuntimeError(f"contribution refused: {contribution!r} {opener.refusal}")
        if isinstance(mean, DpSum):
            mean.add(contribution.update, contribution.metrics, contribution.norm)
            if noise is None:  # as the worker, the release's noise drawn on a thread during the stream
                noise = Rehearsed(ChaChaGaussian.secure(), mean.noise_plan())
        else:
            mean.add(contribution.update, float(contribution.num_examples))
    if isinstance(mean, DpSum):
        assert noise is not None
        update = mean.release(noise)[0]
    else:
        update = mean.mean()
    checkpoints.encode(update)
    return time.perf_counter() - began


def limit(job: Job, count: int) -> float:
    """Seconds to HPKE-open ``count`` envelopes and add their float32 data into one float64 array."""
    began = time.perf_counter()
    total = np.zeros(job.parameters, dtype=np.float64)
    for i in range(count):
        envelope = upload_pb2.EncryptedContribution.FromString(job.envelopes[i % DISTINCT][0])
        plaintext = hpke.open_sealed(envelope.ciphertext, job.key, envelope.context)
        header = 8 + int.from_bytes(plaintext[:8], "little")
        np.add(total, np.frombuffer(plaintext, dtype=np.float32, offset=header), out=total)
    return time.perf_counter() - began


def disk_alone(files: list[LocalEnvelope]) -> float:
    """Seconds for the disk to give the files' bytes: each read past the page cache, ``DISK_THREADS`` at a time."""
    began = time.perf_counter()
    with ThreadPoolExecutor(DISK_THREADS) as pool:
        for _ in pool.map(lambda f: read_uncached(f.path, f.max_bytes), files):
            pass
    return time.perf_counter() - began


def with_peak_rss(measure: Callable[[], float]) -> dict[str, float]:
    """Run ``measure``; its seconds, this process's peak RSS (MiB) while it ran and its RSS just before."""
    pages = Path("/proc/self/statm")

    def rss() -> int:
        return int(pages.read_text().split()[1]) * 4096

    before = peak = rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        seconds = measure()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, rss())
    out = {"seconds": seconds, "peak_rss_mib": peak / 2**20, "baseline_mib": before / 2**20}
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        out["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def sides(device: str) -> dict[str, Callable[[Job, int], float]]:
    """The measured sides by name: the product on the CPU with and without DP, the limit, and on the CPU the
    diagnostic sides without the input-list hash (``unhashed``, ``unhashed_dp``), else the product summing on
    ``device`` (``product@cuda``, ``product_dp@cuda``)."""
    out: dict[str, Callable[[Job, int], float]] = {
        "product": lambda job, count: product(job, count, dp=False),
        "product_dp": lambda job, count: product(job, count, dp=True),
        "limit": limit,
    }
    if device == "cpu":  # diagnostic sides (rows of their own, no RSS): the product without its input-list hash
        out["unhashed"] = lambda job, count: product(job, count, dp=False, hashed_too=False)
        out["unhashed_dp"] = lambda job, count: product(job, count, dp=True, hashed_too=False)
    else:
        out[f"product@{device}"] = lambda job, count: product(job, count, dp=False, device=device)
        out[f"product_dp@{device}"] = lambda job, count: product(job, count, dp=True, device=device)
    return out


def run(mode: Mode, load: LoadGenerator) -> list[Result]:
    count = 40 if mode.quick else COUNT
    torch.set_num_threads(1)  # as the worker process does (aggregator/main.py); the limit is numpy's, unaffected
    device = mode.aggregator_device
    accumulation_device(device)  # a device this machine lacks is refused before anything is measured
    job = Job()
    measured = sides(device)
    if device != "cpu":
        product(job, 4, dp=True, device=device)  # untimed: CUDA's context, kernels and allocator start here
    with tempfile.TemporaryDirectory(prefix="fedcompute-bench-") as tmp:
        on_disk = ON_DISK_QUICK if mode.quick else ON_DISK
        files = job.files(Path(tmp), on_disk) if device == "cpu" else []
        timing: list[Callable[[], float]] = [partial(f, job, count) for f in measured.values()]
        if files:  # diagnostic sides (a row of their own, no RSS): the DP product from the disk, the disk alone
            timing += [lambda: product(job, on_disk, dp=True, files=files), lambda: disk_alone(files)]
        timed = interleave(mode.pairs, *timing)
    samples = dict(zip(measured, timed, strict=False))
    rss = {side: _fresh_process_rss(side, count) for side in measured if not side.startswith("unhashed")}
    measured_how = (
        f"{count} contributions per sample, {job.parameters:,} parameters, "
        f"{DISTINCT} distinct envelopes reused; in-process, no gRPC, no key fetch"
    )
    notes = f"{measured_how}; peak RSS of a fresh process"
    rate = [count / s for s in samples["limit"]]
    rows = [("aggregate bench-1m", "product"), ("aggregate bench-1m DP", "product_dp")]
    if device != "cpu":
        rows += [(f"aggregate bench-1m {device}", f"product@{device}"),
                 (f"aggregate bench-1m DP {device}", f"product_dp@{device}")]  # fmt: skip
    results = []
    for name, side in rows:
        extra = {"contributions_per_sample": count, "peak_rss": {"product": rss[side], "limit": rss["limit"]}}
        results.append(
            Result(name, "throughput", "contrib/s", [count / s for s in samples[side]], rate, notes=notes, extra=extra)
        )
        results.append(
            Result(name, "peak RSS", "MiB", [rss[side]["peak_rss_mib"]], [rss["limit"]["peak_rss_mib"]],
                   lower_is_better=True, notes=notes)
        )  # fmt: skip
    if device == "cpu":
        unhashed = (
            "diagnostic, not the product: the same without the worker's sha256 of each envelope against the job's "
            f"input list, a check it must make (the server is untrusted), to show what it costs; {measured_how}"
        )
        for name, side in [("aggregate unhashed", "unhashed"), ("aggregate unhashed DP", "unhashed_dp")]:
            results.append(Result(name, "throughput", "contrib/s", [count / s for s in samples[side]], rate,
                                  notes=unhashed))  # fmt: skip
        from_disk, disk = timed[-2:]
        disk_notes = (
            f"diagnostic: the product with DP over {on_disk} envelope files written past the page cache (as the "
            "server stores uploads; a worker sharing its disk reads them so), against the disk alone reading the same "
            f"files on {DISK_THREADS} threads; {job.parameters:,} parameters, no gRPC, no key fetch"
        )
        results.append(Result("aggregate DP from disk", "throughput", "contrib/s", [on_disk / s for s in from_disk],
                              [on_disk / s for s in disk], notes=disk_notes))  # fmt: skip
    return results


def _fresh_process_rss(side: str, count: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.aggregate", side, str(count)],
        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    answer: dict[str, float] = json.loads(out.stdout)
    return answer


def main() -> None:
    side, count = sys.argv[1], int(sys.argv[2])
    keep_large_buffers()  # as the worker process (aggregator/main.py) and the timed samples' process have it
    torch.set_num_threads(1)
    job = Job()
    measure = sides(side.partition("@")[2] or "cpu")[side]
    print(json.dumps(with_peak_rss(lambda: measure(job, count))))


COUNT = 1000  # the number; --quick uses 40
ON_DISK = 100  # envelope files for the from-disk row (a 100-device round's, 450 MB); --quick uses 20
ON_DISK_QUICK = 20

if __name__ == "__main__":
    main()
