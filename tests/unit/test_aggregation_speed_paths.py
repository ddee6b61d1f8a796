"""The aggregator's fast paths keep the slow paths' results: in-place float64 sums, the float64 norm, blockwise
noise (the stream's format pinned against a plain reference), noise drawn ahead during the stream, the one-pass
finiteness check, the one-ahead prefetch, and where the sums are kept (the accumulation device; a missing GPU is
refused at start)."""

from __future__ import annotations

import contextvars
import hashlib
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from fedcompute.aggregator import opener as opener_module
from fedcompute.aggregator.contributions import JobContext, Opened, Rejected, _parse_payload
from fedcompute.aggregator.dp import DpParams, DpSum, l2_norm
from fedcompute.aggregator.fedavg import WIDEN_CHUNK, StreamingMean, accumulate, accumulation_device
from fedcompute.aggregator.keys import JobKeys, KeyAccess, KeyUnavailable
from fedcompute.aggregator.main import build_worker
from fedcompute.aggregator.noise import BLOCK, ChaChaGaussian, Rehearsed
from fedcompute.aggregator.opener import (
    DISK_AHEAD,
    DISK_THREADS,
    OPEN_AHEAD,
    OPEN_THREADS,
    Hashed,
    Item,
    LocalEnvelope,
    Opener,
)
from fedcompute.aggregator.opener import read_and_hash as _digest
from fedcompute.aggregator.worker import _drawn_ahead
from fedcompute.attestation.results import ReleaseBinding
from fedcompute.core import checkpoints
from fedcompute.core.context import ContributionContext
from fedcompute.core.prefetch import prefetched
from fedcompute.core.settings import Settings
from fedcompute.core.telemetry import WorkerMetrics
from fedcompute.keys import hpke
from fedcompute.keys.envelope import seal_contribution
from fedcompute.v1 import aggregation_pb2, common_pb2

KEY = bytes(range(32))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference_block(stream: CipherContext, n: int) -> np.ndarray:
    """The format, written plainly: 4n keystream words; u1 = the first 2n, u2 = the next 2n; Box–Muller's cosines
    then sines; four rows of n summed in order, over 2."""
    words = np.frombuffer(stream.update(b"\x00" * (32 * n)), dtype="<u8")
    uniforms = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u1, u2 = 1.0 - uniforms[: 2 * n], uniforms[2 * n :]
    radius = np.sqrt(-2.0 * np.log(u1))
    normals = np.concatenate([radius * np.cos(2.0 * np.pi * u2), radius * np.sin(2.0 * np.pi * u2)])
    rows = normals.reshape(4, n)
    summed: np.ndarray = ((rows[0] + rows[1]) + rows[2]) + rows[3]
    return summed


def test_noise_blocks_follow_the_pinned_format_and_calls_compose() -> None:
    count = 2 * BLOCK + 7  # two whole blocks and a short one
    stream = Cipher(algorithms.ChaCha20(KEY, b"\x00" * 16), mode=None).encryptor()
    expected = np.concatenate([_reference_block(stream, n) for n in (BLOCK, BLOCK, 7)]) * 1.5 / 2.0
    assert np.array_equal(ChaChaGaussian(KEY).gaussian(count, 1.5), expected)
    source = ChaChaGaussian(KEY)
    pieces = [source.gaussian(n, 1.5) for n in (BLOCK, BLOCK, 7)]
    assert np.array_equal(np.concatenate(pieces), expected)  # asking block by block gives the same samples


def test_dp_release_adds_the_same_noise_as_one_call_for_the_whole_tensor() -> None:
    params = DpParams(clip_norm=1e4, noise_multiplier=0.8e-3, expected_clients=3, min_clients=1)  # not clipped
    dp = DpSum(params)
    update = {"big": torch.linspace(-1, 1, BLOCK + 100).reshape(-1, 4), "small": torch.ones(3)}
    dp.add(update)
    released, _ = dp.release(ChaChaGaussian(KEY))
    noise = ChaChaGaussian(KEY)
    for name in ("big", "small"):  # sorted order, as release draws them
        total = update[name].to(torch.float64)
        sample = torch.from_numpy(noise.gaussian(total.numel(), 8.0).reshape(tuple(total.shape)))
        assert torch.equal(released[name], ((total + sample) / 3).to(torch.float32))


def _dp_with_everything() -> DpSum:
    """A DP sum whose release draws tensor noise (several blocks, short ones), metric noise and adaptive-clip
    noise from one source."""
    params = DpParams(
        clip_norm=2.0, noise_multiplier=0.7, expected_clients=3, min_clients=1, adaptive_clip=True,
        clipped_count_stddev=0.5, metric_bounds=(("accuracy", 1.0), ("loss", 10.0)),
    )  # fmt: skip
    dp = DpSum(params)
    update = {"big": torch.linspace(-1, 1, 2 * BLOCK + 100), "small": torch.ones(3, 5), "tiny": torch.ones(1)}
    for scale in (0.5, 3.0):
        dp.add({k: v * scale for k, v in update.items()}, {"accuracy": 0.7 * scale, "loss": scale})
    return dp


def test_noise_drawn_ahead_releases_the_same_bytes_as_noise_drawn_at_the_release() -> None:
    """The worker draws the release's tensor noise on a thread while contributions still stream in
    (``noise.Rehearsed``, worker.py ``_noise_ahead``); the release, its metrics and the next clip norm are then
    exactly those of a source called at the release."""
    direct, ahead = _dp_with_everything(), _dp_with_everything()
    plan = ahead.noise_plan()
    assert [count for count, _ in plan] == [BLOCK, BLOCK, 100, 15, 1]  # sorted names, blocks, the short ones
    rehearsed = Rehearsed(ChaChaGaussian(KEY), plan)
    source = ChaChaGaussian(KEY)
    (expected, clip), (got, got_clip) = direct.release(source), ahead.release(rehearsed)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert got_clip == clip
    assert ahead.release_metrics(rehearsed) == direct.release_metrics(source)  # after the plan: the source itself
    assert np.array_equal(rehearsed.gaussian(9, 1.0), source.gaussian(9, 1.0))


def test_noise_drawn_ahead_is_served_only_in_its_order_and_only_for_the_release_calls() -> None:
    plan = [(BLOCK, 1.0), (7, 1.0)]
    rehearsed = Rehearsed(ChaChaGaussian(KEY), plan)
    with pytest.raises(ValueError, match="rehearsed call is"):
        rehearsed.gaussian(7, 1.0)  # the second call first: nothing served out of order
    with pytest.raises(ValueError, match="rehearsed call is"):
        rehearsed.gaussian(BLOCK, 2.0)  # another deviation
    assert np.array_equal(rehearsed.gaussian(BLOCK, 1.0), ChaChaGaussian(KEY).gaussian(BLOCK, 1.0))
    # the worker uses a draw (made under the attempt's one noise key) only if made for the release's own calls
    drawn = Rehearsed(ChaChaGaussian(KEY), plan)
    assert _drawn_ahead(drawn, plan) is drawn
    assert _drawn_ahead(drawn, [(BLOCK, 1.0), (8, 1.0)]) is None
    assert _drawn_ahead(None, plan) is None  # too large to draw ahead: drawn at the release


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.integers(1, 10_000)), min_size=1, max_size=6))
def test_in_place_weighted_sum_matches_the_float64_product_sum(items: list[tuple[float, int]]) -> None:
    rng = np.random.default_rng(3)  # synthetic updates only
    mean = StreamingMean()
    reference = torch.zeros(257, dtype=torch.float64)
    for scale, weight in items:
        tensor = torch.from_numpy(rng.standard_normal(257).astype(np.float32) * np.float32(scale))
        mean.add({"w": tensor}, float(weight))
        reference += tensor.to(torch.float64) * weight
    expected = (reference / sum(w for _, w in items)).to(torch.float32)
    assert torch.allclose(mean.mean()["w"], expected, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("size", [7, WIDEN_CHUNK + 1, 2 * WIDEN_CHUNK, 3 * WIDEN_CHUNK + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alpha", [1.0, 0.937, 3e-4])
@pytest.mark.parametrize("strided", [False, True])
def test_chunked_widening_sums_bit_for_bit_as_torch_add(
    size: int, dtype: torch.dtype, alpha: float, strided: bool
) -> None:
    generator = torch.Generator().manual_seed(size)
    update = torch.randn(2 * size if strided else size, generator=generator).to(dtype)
    update = update[::2] if strided else update  # a view with a stride: not contiguous
    start = torch.randn(size, generator=generator, dtype=torch.float64)
    expected, total = start.clone(), start.clone()
    expected.add_(update, alpha=alpha)
    accumulate(total, update, alpha)
    assert torch.equal(total, expected)


def test_chunked_widening_keeps_torch_shape_rules() -> None:
    width = WIDEN_CHUNK
    with pytest.raises(RuntimeError):
        accumulate(torch.zeros(4, width, dtype=torch.float64), torch.ones(width, 4), 1.0)  # add_ refuses it too
    total = torch.zeros(3, 2 * width, dtype=torch.float64)
    accumulate(total, torch.ones(2 * width), 1.0)  # broadcast to every row, as add_ does
    assert float(total.sum()) == 3 * 2 * width


def test_l2_norm_is_the_float64_norm_and_infinite_when_a_value_is_not() -> None:
    update = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([12.0]), "empty": torch.zeros(0)}
    assert l2_norm(update) == 13.0
    assert l2_norm({"big": torch.full((4,), 3e38)}) == pytest.approx(6e38)  # float32 squares would overflow
    for bad in (math.nan, math.inf):
        assert l2_norm({"a": torch.tensor([1.0, bad])}) == math.inf


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_single_non_finite_value_is_rejected(bad: float, norm: bool) -> None:
    values = torch.zeros(1000)
    values[617] = bad
    job = JobContext("p", "t", 1, "a", 1, "", "", {"w": ((1000,), torch.float32), "e": ((0,), torch.float32)})
    payload = checkpoints.encode({"w": values, "e": torch.zeros(0)}, {"num_examples": 1})
    with pytest.raises(Rejected) as info:
        _parse_payload(payload, job, norm)
    assert info.value.reason == "non_finite"
    ok = checkpoints.encode({"w": torch.full((1000,), 3e38), "e": torch.zeros(0)}, {"num_examples": 1})
    opened = _parse_payload(ok, job, norm)
    assert opened.num_examples == 1
    assert opened.norm == (pytest.approx(3e38 * math.sqrt(1000)) if norm else None)


def test_the_norm_computed_while_opening_is_the_float64_norm_and_clips_the_same() -> None:
    generator = torch.Generator().manual_seed(3)
    update = {"w": torch.randn(300_001, generator=generator), "b": torch.randn(7, generator=generator)}
    job = JobContext("p", "t", 1, "a", 1, "", "", {k: (tuple(v.shape), v.dtype) for k, v in update.items()})
    opened = _parse_payload(checkpoints.encode(update, {"num_examples": 1}), job, norm=True)
    exact = math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for t in update.values()))
    assert opened.norm == pytest.approx(exact, rel=1e-12)  # chunked float64, across chunk boundaries
    params = DpParams(clip_norm=1.0, noise_multiplier=0.0, expected_clients=1, min_clients=1)
    given_norm, computed = DpSum(params), DpSum(params)
    given_norm.add(opened.update, {}, opened.norm)
    computed.add(update)
    source = ChaChaGaussian(KEY)
    assert torch.equal(given_norm.release(source)[0]["w"], computed.release(source)[0]["w"])


def test_cpu_is_the_default_and_a_missing_gpu_is_refused_at_start(tmp_path: Path) -> None:
    assert Settings(workdir=tmp_path).aggregator_device == "cpu"
    assert accumulation_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to refuse")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=r"CUDA is not available.*FEDCOMPUTE_AGGREGATOR_DEVICE=cpu"):
            accumulation_device(name)
    settings_ = Settings(workdir=tmp_path, aggregator_device="cuda", attester_socket=tmp_path / "absent.sock")
    with pytest.raises(SystemExit, match="aggregator worker not started: aggregator_device is 'cuda'"):
        build_worker(settings_, "worker-1")


@CUDA
def test_sums_on_the_gpu_match_the_cpu() -> None:
    _sums_match_the_cpu_on("cuda")


def test_the_gpu_comparison_holds_with_the_cpu_in_its_place() -> None:
    _sums_match_the_cpu_on("cpu")  # the comparison itself, run where there is no GPU


def _sums_match_the_cpu_on(device: str) -> None:
    # "w" spans three noise blocks (the last one partial); the DP sums take their norm on the device (norm=None)
    update = {"w": torch.linspace(-2, 2, 2 * BLOCK + 5000), "b": torch.ones(7)}
    on_device = {k: t.to(device) for k, t in update.items()}
    assert l2_norm(on_device) == pytest.approx(l2_norm(update), rel=1e-12)
    assert l2_norm({"w": on_device["w"], "x": torch.tensor([math.inf], device=device)}) == math.inf
    cpu, other = StreamingMean(), StreamingMean(device)
    for weight in (1.0, 3.0):
        cpu.add(update, weight)
        other.add(update, weight)
    for name, tensor in other.mean().items():
        assert tensor.device.type == "cpu"
        assert torch.allclose(tensor, cpu.mean()[name])
    params = DpParams(clip_norm=1.0, noise_multiplier=1.0, expected_clients=3, min_clients=1, adaptive_clip=True,
                      clipped_count_stddev=0.5)  # fmt: skip
    dp_cpu, dp_other = DpSum(params), DpSum(params, device)
    for dp in (dp_cpu, dp_other):
        dp.add(update)  # norm ~426: clipped
        dp.add({k: t * -0.25 for k, t in update.items()})  # another norm, another clip factor
        dp.add({k: t * 1e-3 for k, t in update.items()})  # norm ~0.43: not clipped
    released_cpu, clip_cpu = dp_cpu.release(ChaChaGaussian(KEY))
    released_other, clip_other = dp_other.release(ChaChaGaussian(KEY))
    assert clip_other == clip_cpu  # the noised unclipped count: one of three on both
    for name, tensor in released_other.items():
        assert tensor.device.type == "cpu"
        assert torch.allclose(tensor, released_cpu[name], atol=1e-6)


def test_prefetch_keeps_order_stays_one_ahead_and_raises_in_order() -> None:
    started: list[int] = []
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

    def work(i: int) -> tuple[int, str]:
        started.append(i)
        if i == 3:
            raise KeyError(i)
        return i * 10, request_id.get()

    request_id.set("job-1")
    results = prefetched(range(6), work)
    assert next(results) == (0, "job-1")  # the caller's context variables reach the thread
    assert set(started) <= {0, 1}  # at most one ahead of the caller
    assert [next(results), next(results)] == [(10, "job-1"), (20, "job-1")]
    with pytest.raises(KeyError):
        next(results)
    assert started[:4] == [0, 1, 2, 3]
    assert set(started) <= {0, 1, 2, 3, 4}  # the item in flight finished (or was never started); nothing after
    started.clear()
    early = prefetched(range(100), work)
    next(early)
    early.close()
    assert set(started) <= {0, 1}
    # two threads two ahead: results still in order, whichever thread finishes first
    started.clear()

    def uneven(i: int) -> tuple[int, str]:
        time.sleep(0.01 * (i % 2))  # the odd items finish after the even ones started after them
        return work(i)

    wide = prefetched(range(100), uneven, ahead=2)
    assert next(wide) == (0, "job-1")
    assert set(started) <= {0, 1, 2}
    assert [next(wide), next(wide)] == [(10, "job-1"), (20, "job-1")]
    with pytest.raises(KeyError):
        next(wide)
    assert set(started) <= {0, 1, 2, 3, 4, 5}  # the failing item and the two in flight after it; nothing later
    # one thread, three ahead: the items wait for the thread in the pool's queue, started in order
    started.clear()
    queued = prefetched(range(100), work, ahead=3, threads=1)
    assert next(queued) == (0, "job-1")
    assert set(started) <= {0, 1, 2, 3}
    assert started == sorted(started)
    queued.close()
    for threads in (0, 4):
        with pytest.raises(ValueError, match="threads must be in"):
            next(prefetched(range(3), work, ahead=3, threads=threads))


def test_the_opener_stops_at_the_first_item_off_the_input_list_and_after_an_error(tmp_path: Path) -> None:
    key = hpke.generate_private_key()
    job = JobContext("pop", "t", 1, "agg", 1, "ab" * 32, "cd" * 32, {})
    payload = checkpoints.encode({}, {"num_examples": 2})

    def item(assignment_id: str) -> aggregation_pb2.StreamContributionsResponse:
        context = ContributionContext("pop", "t", 1, "agg", assignment_id, "k", 1, "ab" * 32, "cd" * 32)
        envelope = seal_contribution(payload, context, hpke.public_bytes(key.public_key())).SerializeToString()
        return aggregation_pb2.StreamContributionsResponse(assignment_id=assignment_id, envelope=envelope)

    items = [item("a1"), item("a2"), item("a3")]
    inputs = [(i.assignment_id, hashlib.sha256(i.envelope).hexdigest()) for i in items]
    asked: list[str] = []

    def keys(key_id: str) -> X25519PrivateKey:
        asked.append(key_id)
        return key

    metrics = WorkerMetrics.create(CollectorRegistry())
    opener = Opener(inputs, job, keys, metrics)
    first = opener.open(opener.check(_digest(items[0])))
    assert isinstance(first, Opened)
    assert first.num_examples == 2
    assert opener.open(opener.check(_digest(items[2]))) is None  # out of order: not the input set's
    assert opener.refusal == "contribution 1 of the stream ('a3') is not the input set's contribution 1 ('a2'); refused"
    assert opener.open(opener.check(_digest(items[1]))) is None  # nothing is opened after a mismatch
    assert (opener.matched, asked) == (1, ["k"])

    # the refusal names what was wrong: bytes that are not the listed ones, or more items than the list holds
    last = items[0].envelope[-1] ^ 1  # a byte changed (a fixed replacement equals the random last byte 1 time in 256)
    altered = aggregation_pb2.StreamContributionsResponse(
        assignment_id="a1", envelope=items[0].envelope[:-1] + bytes([last])
    )
    named = Opener(inputs, job, keys, metrics)
    assert named.check(_digest(altered)) is None
    assert named.refusal.startswith("contribution 0 of the stream ('a1') does not hash to the input set's sha256")
    past = Opener(inputs[:1], job, keys, metrics)
    assert past.check(_digest(items[0])) is not None
    assert past.check(_digest(items[1])) is None
    assert past.refusal == "contribution 1 of the stream ('a2') is past the job's input set of 1; refused"

    def unavailable(key_id: str) -> X25519PrivateKey:
        asked.append(key_id)
        raise KeyUnavailable("1 of 3 key services reachable")

    asked.clear()
    failing = Opener(inputs, job, unavailable, metrics)
    with pytest.raises(KeyUnavailable):
        failing.open(failing.check(_digest(items[0])))
    assert failing.check(_digest(items[1])) is None  # the prefetched next item asks nothing more
    assert failing.open((items[1].envelope, "a2")) is None  # nor would an item already checked, once stopped
    assert asked == ["k"]

    # the worker's stage (each item hashed, checked in order and opened, on two threads, three ahead): a stream whose
    # second item is not the input set's opens the first, then nothing more, whatever the threads' timing
    for _ in range(20):
        asked.clear()
        piped = Opener(inputs, job, keys, metrics)
        outcomes = list(piped.outcomes(iter([items[0], items[2], items[1], items[1]])))
        assert isinstance(outcomes[0], Opened)
        assert outcomes[1:] == [None, None, None]
        assert (piped.matched, asked) == (1, ["k"])
    # the same streams as files of a blob directory, read on the disk's threads (four, six ahead)
    files = []
    for index, listed in enumerate([items[0], items[2], items[1], items[1], items[2]]):
        path = tmp_path / f"envelope-{index}"
        path.write_bytes(listed.envelope)
        files.append(LocalEnvelope(listed.assignment_id, path, len(listed.envelope)))
    for _ in range(20):
        asked.clear()
        piped = Opener(inputs, job, keys, metrics)
        outcomes = list(piped.outcomes(files[:4]))
        assert isinstance(outcomes[0], Opened)
        assert outcomes[1:] == [None, None, None]
        assert (piped.matched, asked) == (1, ["k"])
        in_order = list(Opener(inputs, job, keys, metrics).outcomes([files[0], files[2], files[4]]))
        assert [o.num_examples for o in in_order if isinstance(o, Opened)] == [2, 2, 2]
    # the first item, off the list, is hashed slowly: the second, a listed one hashed at once on the other thread,
    # waits for its turn to be checked, so it is never opened and no key is asked for
    slow = aggregation_pb2.StreamContributionsResponse(assignment_id="a1", envelope=altered.envelope)
    late: list[str] = []

    def slow_first(item: Item) -> Hashed:
        hashed = _digest(item)
        if hashed[1] == slow.envelope:
            time.sleep(0.05)
        late.append(item.assignment_id)
        return hashed

    asked.clear()
    gated = Opener(inputs, job, keys, metrics, digest=slow_first)
    assert list(gated.outcomes(iter([slow, items[1], items[2]]))) == [None, None, None]
    assert (gated.matched, asked) == (0, [])
    assert gated.refusal.startswith("contribution 0 of the stream ('a1') does not hash")
    assert late[0] == "a2"  # the item after it was hashed first, and still waited
    # the listed stream, its first item hashed last: every item opened, in order, each checked in its turn
    asked.clear()
    outcomes = list(Opener(inputs, job, keys, metrics, digest=_slow(items[0].envelope)).outcomes(iter(items)))
    assert [o.num_examples for o in outcomes if isinstance(o, Opened)] == [2, 2, 2]
    assert asked == ["k", "k", "k"]

    # an item that cannot be read raises in its place; nothing after it is opened (the worker fails the job)
    def unreadable(item: Item) -> Hashed:
        if item.assignment_id == "a2":
            raise OSError("envelope gone")
        return _digest(item)

    asked.clear()
    broken = Opener(inputs, job, keys, metrics, digest=unreadable).outcomes(iter(items))
    assert isinstance(next(broken), Opened)
    with pytest.raises(OSError, match="envelope gone"):
        next(broken)
    assert asked == ["k"]


def test_files_are_worked_on_by_the_disks_threads_and_anything_else_by_the_opening_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paced: list[tuple[int, int | None]] = []

    def recorded(items: Any, work: Any, ahead: int = 1, threads: int | None = None) -> Any:
        paced.append((ahead, threads))
        return prefetched(items, work, ahead, threads)

    monkeypatch.setattr(opener_module, "prefetched", recorded)
    job = JobContext("pop", "t", 1, "agg", 1, "ab" * 32, "cd" * 32, {})
    metrics = WorkerMetrics.create(CollectorRegistry())

    def opener() -> Opener:  # an empty input list: every item is refused, no key is ever asked for
        return Opener([], job, lambda key_id: hpke.generate_private_key(), metrics)

    (tmp_path / "e").write_bytes(b"x")
    assert list(opener().outcomes([LocalEnvelope("a", tmp_path / "e", 1)])) == [None]  # past the (empty) input list
    assert list(opener().outcomes(iter([aggregation_pb2.StreamContributionsResponse(assignment_id="a")]))) == [None]
    once = opener()
    assert list(once.outcomes([])) == []
    with pytest.raises(RuntimeError, match="one stream"):  # its turns would wait forever for a second stream's
        next(once.outcomes([]))
    assert paced == [(DISK_AHEAD, DISK_THREADS), (OPEN_AHEAD, OPEN_THREADS), (OPEN_AHEAD, OPEN_THREADS)]
    assert DISK_THREADS > OPEN_THREADS


def test_stopping_early_never_leaves_a_thread_waiting_for_a_cancelled_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's shutdown once cancelled the queued items one by one while a thread could take the next one, which
    then waited forever for the turn of a cancelled item, and the worker with it (found by a review, 2026-12-02: one
    try in tens to hundreds with a fast thread switch). A slow cancel makes that moment certain; now nothing is
    cancelled, and the items already handed to the threads pass their turns unread."""
    real_cancel = Future.cancel

    def slow_cancel(self: Future[object]) -> bool:
        time.sleep(0.2)
        return real_cancel(self)

    monkeypatch.setattr(Future, "cancel", slow_cancel)
    read: list[str] = []

    def digest(item: Item) -> Hashed:
        time.sleep(0.02 if item.assignment_id == "a0" else 0.1)  # the others still being read at the stop
        read.append(item.assignment_id)
        return item.assignment_id, b"x", hashlib.sha256(b"x").hexdigest()

    job = JobContext("pop", "t", 1, "agg", 1, "ab" * 32, "cd" * 32, {})
    files = [LocalEnvelope(f"a{i}", tmp_path / "unread", 1) for i in range(20)]
    inputs = [(f"a{i}", "0" * 64) for i in range(20)]  # a0's hash is not the listed one: the stream is refused
    asked: list[str] = []

    def keys(key_id: str) -> X25519PrivateKey:
        asked.append(key_id)
        return hpke.generate_private_key()

    opener = Opener(inputs, job, keys, WorkerMetrics.create(CollectorRegistry()), digest=digest)
    outcomes = opener.outcomes(files)
    assert next(outcomes) is None  # the worker fails the job and stops here
    closing = threading.Thread(target=outcomes.close, daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive(), "the stage did not stop: a thread waits for a turn that never comes"
    assert sorted(read) == ["a0", "a1", "a2", "a3"]  # those the threads were reading; the queued ones never read
    assert asked == []
    # the caller stops after an outcome of its own accord (an error while adding, say): the items queued behind
    # the threads pass their turns unread too
    read.clear()
    listed = [(f"a{i}", hashlib.sha256(b"x").hexdigest()) for i in range(20)]
    stopped = Opener(listed, job, keys, WorkerMetrics.create(CollectorRegistry()), digest=digest).outcomes(files)
    assert isinstance(next(stopped), Rejected)  # b"x" is no envelope: rejected, the stream goes on
    stopped.close()
    assert {"a5", "a6"}.isdisjoint(read)  # queued at the stop (a4 may have been taken just before it)
    assert set(read) <= {"a0", "a1", "a2", "a3", "a4"}


def _slow(envelope: bytes) -> Callable[[Item], Hashed]:
    def digest(item: Item) -> Hashed:
        hashed = _digest(item)
        if hashed[1] == envelope:
            time.sleep(0.05)
        return hashed

    return digest


def test_a_jobs_key_is_obtained_once_however_many_threads_open_and_a_failure_is_not_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker opens on two threads: both may need the job's key at once. Each obtain is a release request to
    the key services (it spends their release budgets), so the key is obtained once, and a failure to obtain it
    is raised again to the other thread, not asked again. The obtain itself (attestation, shares: network) is
    replaced by one that counts; the rest is JobKeys' own."""
    key = hpke.generate_private_key()
    obtained: list[str] = []
    access = KeyAccess(providers=[], trusted={}, threshold=1, verifier=None, evidence=lambda nonces: "")  # type: ignore[arg-type]

    def obtain(self: JobKeys, key_id: str) -> X25519PrivateKey:
        obtained.append(key_id)
        time.sleep(0.05)  # the other threads arrive meanwhile
        if key_id == "down":
            raise KeyUnavailable("1 of 3 key services reachable")
        return key

    monkeypatch.setattr(JobKeys, "_obtain", obtain)
    keys = JobKeys(access, aggregation_pb2.AggregationJob(job_id="job_x"), "ab" * 32, [])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(keys, ["k"] * 4))
        failures = [pool.submit(keys, "down") for _ in range(4)]
    assert all(k is key for k in got)
    for failure in failures:
        with pytest.raises(KeyUnavailable, match="1 of 3"):
            failure.result()
    assert obtained == ["k", "down"]


def test_an_attempt_asks_every_key_id_for_one_recipient_key_and_the_next_attempt_for_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key services charge an aggregation attempt once, by its recipient key (bound by its attestation result):
    so one attempt (one ``JobKeys``) binds the same recipient key into the release of every key id it needs (a round
    spanning a key rotation), and the next attempt a fresh one, charged again as the new output it is. The network
    steps (the published key, attestation) are replaced by ones that record the binding and stop there."""
    bound: list[tuple[int, str, bytes]] = []
    access = KeyAccess(providers=[], trusted={}, threshold=0, verifier=None, evidence=lambda nonces: "")  # type: ignore[arg-type]

    def attest(self: JobKeys, binding: ReleaseBinding) -> str:
        bound.append((id(self), binding.key_id, binding.recipient_public_key))
        raise KeyUnavailable("stopped after the binding")

    monkeypatch.setattr(JobKeys, "_published", lambda self, key_id: common_pb2.PublicKey(key_id=key_id))
    monkeypatch.setattr(JobKeys, "_attest", attest)
    attempts = [JobKeys(access, aggregation_pb2.AggregationJob(job_id="job_x"), "ab" * 32, []) for _ in range(2)]
    for keys in attempts:
        for key_id in ("old", "rotated"):
            with pytest.raises(KeyUnavailable):
                keys(key_id)
    assert [(key_id, attempt) for attempt, key_id, _ in bound] == [
        ("old", id(attempts[0])), ("rotated", id(attempts[0])), ("old", id(attempts[1])), ("rotated", id(attempts[1])),
    ]  # fmt: skip
    recipients = [recipient for _, _, recipient in bound]
    assert recipients[0] == recipients[1] != recipients[2] == recipients[3]
    assert all(len(r) == 32 for r in recipients)


@pytest.mark.parametrize(
    ("refusals", "expected"),
    [
        (["privacy-budget"], "KeyRefused"),  # two services may still release: not spent for good
        (["privacy-budget", "PERMISSION_DENIED"], "KeyRefused"),
        (["privacy-budget", "privacy-budget"], "BudgetExhausted"),  # one left of the two needed
        # RESOURCE_EXHAUSTED without the budget trailer (gRPC's own, for a request past a receive limit): a
        # refusal of this attempt, never taken for the budget (found by review, 2026-12-02)
        (["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"], "KeyRefused"),
    ],
)
def test_the_budget_is_spent_for_good_only_when_too_few_key_services_are_left_to_release(
    monkeypatch: pytest.MonkeyPatch, refusals: list[str], expected: str
) -> None:
    """Each key service keeps its own ledger (one away during an earlier attempt was not charged for it), so one
    service's RESOURCE_EXHAUSTED ends the task as BUDGET_EXHAUSTED only when the services that have not said so
    are fewer than the threshold; otherwise the refusal fails this attempt only (found by a review, 2026-12-02:
    any budget refusal among 2-of-3 services ended the task). The network steps are replaced; the decision is
    JobKeys' own."""
    import jwt

    from fedcompute.aggregator.keys import BudgetExhausted, KeyRefused

    class Reachable:
        def reachable(self) -> bool:
            return True

    access = KeyAccess(providers=[Reachable()] * 3, trusted={}, threshold=2, verifier=None, evidence=lambda n: "")  # type: ignore[list-item, arg-type]
    codes = refusals  # as _collect names them: the budget's trailer, else the code's name
    monkeypatch.setattr(JobKeys, "_published", lambda self, key_id: common_pb2.PublicKey(key_id=key_id))
    monkeypatch.setattr(JobKeys, "_attest", lambda self, binding: jwt.encode({"jti": "r"}, "k" * 32))
    monkeypatch.setattr(JobKeys, "_collect", lambda self, *args: ({}, ["refused"] * len(codes), codes))
    keys = JobKeys(access, aggregation_pb2.AggregationJob(job_id="job_x"), "ab" * 32, [])
    with pytest.raises(KeyRefused) as info:
        keys("k")
    assert type(info.value) is {"KeyRefused": KeyRefused, "BudgetExhausted": BudgetExhausted}[expected]
