"""DP-FedAvg at the user level, inside the aggregator: re-clip, sum in float64, noise once, fixed denominator.

Each decrypted update is clipped to L2 norm C over all its tensors; the clipped updates are summed in float64
(uniform weights: example counts would leak); N(0, (z·C)²) is added once per coordinate to the sum; the sum is
divided by the fixed expected count m. Nothing is released below ``min_clients``. With adaptive clipping
(Andrew et al. 2021) the noised fraction of unclipped updates moves C geometrically toward the target quantile.
Metrics the policy releases are a second block: each device's value clipped to [0, B] and scaled by 1/(B·√K)
(so the block's sensitivity is 1), summed, noised with the update's multiplier z, rescaled by √K·B/m; a device
that did not report a metric counts as 0 for it. Only the noised mean, the noised metrics and the noised next
clip norm ever leave this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedcompute.aggregator.fedavg import accumulate
from fedcompute.aggregator.noise import BLOCK, NoiseSource


class BelowMinimum(Exception):
    """Too few valid contributions to release anything."""


@dataclass(frozen=True)
class DpParams:
    clip_norm: float
    noise_multiplier: float
    expected_clients: int
    min_clients: int
    adaptive_clip: bool = False
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float = 0.0
    metric_bounds: tuple[tuple[str, float], ...] = ()


NORM_CHUNK = 1 << 17  # values widened to float64 at a time: 1 MiB, cache-sized, instead of a whole-tensor copy


def l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over every tensor, accumulated in float64 (inf if any value is not finite)."""
    total = 0.0
    widest = max((t.numel() for t in update.values() if t.device.type == "cpu"), default=0)
    buffer = torch.empty(min(NORM_CHUNK, widest), dtype=torch.float64)
    for t in update.values():
        flat = t.reshape(-1)
        if t.device.type != "cpu":  # one float64 copy of one tensor at a time, on its device
            wide = flat.to(torch.float64)
            total += float(torch.dot(wide, wide))
            continue
        for start in range(0, flat.numel(), NORM_CHUNK):
            part = buffer[: min(NORM_CHUNK, flat.numel() - start)]
            part.copy_(flat[start : start + NORM_CHUNK])  # widened exactly; the squares are summed in float64
            total += float(torch.dot(part, part))  # torch's BLAS, under the process's torch thread setting
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clip_factor(norm: float, bound: float) -> float:
    """What scales an update of L2 norm ``norm`` to norm <= bound."""
    return min(1.0, bound / norm) if norm > 0 else 1.0


def clip(update: Mapping[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], float]:
    """The update scaled to norm <= bound (float64), and its original norm."""
    norm = l2_norm(update)
    factor = clip_factor(norm, bound)
    return {k: t.to(torch.float64) * factor for k, t in update.items()}, norm


class DpSum:
    """The clipped sum, kept in float64 on ``device`` (where the clip and the noise's addition happen too, and
    the norm when the caller does not pass one: the worker passes the one it took on the CPU while opening);
    what ``release`` returns is on the CPU."""

    def __init__(self, params: DpParams, device: torch.device | str = "cpu") -> None:
        if params.expected_clients <= 0 or params.clip_norm <= 0:
            raise ValueError("expected_clients and clip_norm must be positive")
        self._p = params
        self._device = torch.device(device)
        self._sum: dict[str, torch.Tensor] = {}
        self.count = 0
        self._unclipped = 0
        self._metrics = np.zeros(len(params.metric_bounds), dtype=np.float64)

    def add(
        self, update: Mapping[str, torch.Tensor], metrics: Mapping[str, float] | None = None, norm: float | None = None
    ) -> None:
        """Add one update (the caller has already refused non-finite ones) and, if released, its metrics; ``norm``
        is the update's ``l2_norm`` when the caller has it already (the worker computes it while opening)."""
        if self._sum and set(update) != set(self._sum):
            raise ValueError("update tensors differ from the first contribution's")
        scale = math.sqrt(len(self._p.metric_bounds) or 1)
        for i, (name, bound) in enumerate(self._p.metric_bounds):
            value = (metrics or {}).get(name, 0.0)
            self._metrics[i] += min(max(value, 0.0), bound) / (bound * scale)
        moved = {k: t.to(self._device, non_blocking=True) for k, t in update.items()}
        norm = l2_norm(moved) if norm is None else norm
        factor = clip_factor(norm, self._p.clip_norm)
        for name, tensor in moved.items():
            total = self._sum.get(name)
            if total is None:
                total = self._sum[name] = torch.zeros(tensor.shape, dtype=torch.float64, device=self._device)
            accumulate(total, tensor, factor)
        self.count += 1
        self._unclipped += int(norm <= self._p.clip_norm)

    def release(self, noise: NoiseSource) -> tuple[dict[str, torch.Tensor], float]:
        """The noised mean (float32) and the clip norm for the next round, with noise from ``noise``."""
        if self.count < self._p.min_clients:
            raise BelowMinimum(
                f"{self.count} valid contributions, fewer than min_clients ({self._p.min_clients}); nothing released"
            )
        std = self._std()
        mean: dict[str, torch.Tensor] = {}
        for name, total in sorted(self._sum.items()):
            flat = total.view(-1)
            for start, size in _blocks(flat.numel()):  # the same samples as one call for the whole tensor
                block = flat[start : start + size]
                block.add_(torch.from_numpy(noise.gaussian(size, std)).to(self._device, non_blocking=True))
            mean[name] = (total / self._p.expected_clients).to("cpu", torch.float32).contiguous()
        self._sum.clear()  # the un-noised sum is not kept past this point
        return mean, self._next_clip(noise)

    def noise_plan(self) -> list[tuple[int, float]]:
        """The calls ``release`` will make to its noise source, in order (count, standard deviation), as the sum
        stands: known once the first update is added (every later one has the same tensors)."""
        std = self._std()
        return [(size, std) for _, total in sorted(self._sum.items()) for _, size in _blocks(total.numel())]

    def _std(self) -> float:
        return self._p.noise_multiplier * self._p.clip_norm

    def release_metrics(self, noise: NoiseSource) -> dict[str, float]:
        """The noised means of the released metrics (after ``release``; clamped to their ranges)."""
        bounds = self._p.metric_bounds
        if not bounds:
            return {}
        noised = self._metrics + noise.gaussian(len(bounds), self._p.noise_multiplier)
        self._metrics[:] = 0.0
        scale = math.sqrt(len(bounds)) / self._p.expected_clients
        return {
            name: min(max(float(v) * scale * bound, 0.0), bound)
            for (name, bound), v in zip(bounds, noised, strict=True)
        }

    def _next_clip(self, noise: NoiseSource) -> float:
        p = self._p
        if not p.adaptive_clip:
            return p.clip_norm
        noised = (self._unclipped + float(noise.gaussian(1, p.clipped_count_stddev)[0])) / p.expected_clients
        return float(p.clip_norm * np.exp(-p.clip_learning_rate * (noised - p.target_unclipped_quantile)))


def _blocks(count: int) -> list[tuple[int, int]]:
    """(start, size) of the noise blocks of a tensor of ``count`` values: ``BLOCK`` each, the last one shorter."""
    return [(start, min(BLOCK, count - start)) for start in range(0, count, BLOCK)]
