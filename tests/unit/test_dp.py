"""DP-FedAvg math inside the aggregator: clipping bounds, exact clipped mean without noise, noise statistics,
adaptive clipping, the minimum cohort, and the CSPRNG-keyed noise source."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcompute.aggregator.dp import BelowMinimum, DpParams, DpSum, clip, l2_norm
from fedcompute.aggregator.noise import ChaChaGaussian

KEY = bytes(range(32))


def _update(values: list[float], split: int = 2) -> dict[str, torch.Tensor]:
    t = torch.tensor(values, dtype=torch.float32)
    return {"a": t[:split].clone(), "b": t[split:].clone()}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=3, max_size=40),
    st.floats(1e-3, 1e3),
)
def test_clipped_norm_never_exceeds_c(values: list[float], bound: float) -> None:
    clipped, norm = clip(_update(values), bound)
    assert l2_norm(clipped) <= bound * (1 + 1e-9)
    if norm <= bound:
        assert all(torch.equal(clipped[k], _update(values)[k].to(torch.float64)) for k in clipped)


def test_without_noise_the_aggregate_is_exactly_the_clipped_mean() -> None:
    params = DpParams(clip_norm=1.0, noise_multiplier=0.0, expected_clients=4, min_clients=3)
    dp = DpSum(params)
    updates = [_update([3.0, 4.0, 0.0]), _update([0.1, 0.2, 0.2]), _update([-6.0, 0.0, 8.0])]
    for u in updates:
        dp.add(u)
    mean, next_clip = dp.release(ChaChaGaussian(KEY))
    expected = {k: torch.stack([clip(u, 1.0)[0][k] for u in updates]).sum(0) / 4 for k in ("a", "b")}  # m = 4
    for k in ("a", "b"):
        assert torch.equal(mean[k], expected[k].to(torch.float32))
    assert next_clip == 1.0


def test_noise_std_on_the_mean_is_z_c_over_m() -> None:
    z, c, m = 1.3, 2.0, 10
    dp = DpSum(DpParams(clip_norm=c, noise_multiplier=z, expected_clients=m, min_clients=1))
    dp.add({"w": torch.zeros(200_000)})
    mean, _ = dp.release(ChaChaGaussian(KEY))
    observed = float(mean["w"].to(torch.float64).std())
    assert abs(observed / (z * c / m) - 1) < 0.01
    assert abs(float(mean["w"].to(torch.float64).mean())) < 5 * z * c / m / math.sqrt(200_000)


def test_below_min_clients_nothing_is_released() -> None:
    dp = DpSum(DpParams(clip_norm=1.0, noise_multiplier=1.0, expected_clients=5, min_clients=3))
    dp.add(_update([1.0, 0.0, 0.0]))
    dp.add(_update([0.0, 1.0, 0.0]))
    with pytest.raises(BelowMinimum, match="fewer than min_clients"):
        dp.release(ChaChaGaussian(KEY))


def test_adaptive_clip_converges_toward_the_target_quantile() -> None:
    rng = np.random.default_rng(7)  # synthetic update norms only; the DP noise itself comes from ChaCha
    noise = ChaChaGaussian(KEY)
    m, c = 200, 0.1
    norms = rng.lognormal(mean=0.0, sigma=0.5, size=100_000)
    target = float(np.quantile(norms, 0.5))
    for _ in range(80):
        params = DpParams(c, 0.0, m, 1, adaptive_clip=True, clipped_count_stddev=m / 20)
        dp = DpSum(params)
        for n in rng.choice(norms, size=m):
            dp.add({"w": torch.tensor([n, 0.0], dtype=torch.float64)})
        _, c = dp.release(noise)
    assert abs(c / target - 1) < 0.25


def test_noise_source_is_keyed_and_normal() -> None:
    fixed = ChaChaGaussian(KEY).gaussian(1000, 1.0)
    assert np.array_equal(fixed, ChaChaGaussian(KEY).gaussian(1000, 1.0))
    assert not np.array_equal(ChaChaGaussian.secure().gaussian(10, 1.0), ChaChaGaussian.secure().gaussian(10, 1.0))
    samples = ChaChaGaussian(KEY).gaussian(400_000, 3.0)
    assert abs(samples.std() / 3.0 - 1) < 0.01
    assert abs(samples.mean()) < 0.02
    kurtosis = float(np.mean(samples**4) / np.mean(samples**2) ** 2)
    assert abs(kurtosis - 3.0) < 0.05  # Gaussian tails, not uniform or Laplace
    assert samples.dtype == np.float64


def test_released_metrics_are_clipped_means_and_noised_at_the_update_multiplier() -> None:
    bounds = (("accuracy", 1.0), ("loss", 5.0))
    exact = DpSum(
        DpParams(clip_norm=1.0, noise_multiplier=0.0, expected_clients=4, min_clients=1, metric_bounds=bounds)
    )
    for metrics in ({"loss": 9.0, "accuracy": 0.5}, {"loss": 1.0, "accuracy": 1.0}, {"loss": 2.0}):
        exact.add({"w": torch.zeros(3)}, metrics)
    exact.release(ChaChaGaussian(KEY))
    # loss clipped to 5; the device without accuracy counts 0; the denominator is the fixed m = 4
    assert exact.release_metrics(ChaChaGaussian(KEY)) == pytest.approx({"accuracy": 1.5 / 4, "loss": 8.0 / 4})
    z, m, trials = 0.7, 10, 1000
    draws = []
    for trial in range(trials):
        noisy = DpSum(
            DpParams(clip_norm=1.0, noise_multiplier=z, expected_clients=m, min_clients=1, metric_bounds=bounds)
        )
        for _ in range(m):  # mean loss 2.5, mid-range, so clamping to [0, 5] stays rare
            noisy.add({"w": torch.zeros(1)}, {"loss": 2.5, "accuracy": 0.5})
        noise = ChaChaGaussian(hashlib.sha256(KEY + trial.to_bytes(4, "big")).digest())
        noisy.release(noise)
        draws.append(noisy.release_metrics(noise))  # the worker's order: the same stream, after the update
    # sensitivity 1 for the block: per metric the noise is z·√K·bound/m before clamping (K = 2)
    spread = float(np.std([d["loss"] for d in draws]))
    clamped_share = np.mean([d["loss"] in (0.0, 5.0) for d in draws])
    assert clamped_share < 0.01
    assert abs(spread / (z * math.sqrt(2) * 5.0 / m) - 1) < 0.1
    assert DpSum(DpParams(1.0, 0.0, 4, 1)).release_metrics(ChaChaGaussian(KEY)) == {}


def test_noised_metrics_take_their_share_of_the_accounted_multiplier() -> None:
    from fedcompute.core.privacy import update_noise_multiplier

    assert update_noise_multiplier(1.5, 0.0) == pytest.approx(1.5)
    assert update_noise_multiplier(1.5, 0.0, noised_metrics=True) == pytest.approx(1.5 * math.sqrt(2))
    z, sigma = 1.0, 2.0  # adaptive clipping's count at 2σ_b, then two mechanisms at z_Δ: z⁻² = 2 z_Δ⁻² + (2σ_b)⁻²
    z_delta = update_noise_multiplier(z, sigma, noised_metrics=True)
    assert z**-2 == pytest.approx(2 * z_delta**-2 + (2 * sigma) ** -2)
