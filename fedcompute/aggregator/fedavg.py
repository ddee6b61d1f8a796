"""Streaming weighted FedAvg: one running float64 sum, never all contributions in memory at once; and where the
sums are kept (``accumulation_device``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

WIDEN_CHUNK = 1 << 17  # values widened to float64 at a time by ``accumulate``: 1 MiB, cache-sized


def accumulate(total: torch.Tensor, update: torch.Tensor, alpha: float) -> None:
    """``total += alpha * update``, element by element in ``total``'s dtype (float64). On the CPU a narrower update
    is widened a cache-sized chunk at a time into a buffer that is then added: torch's mixed-dtype ``add_`` first
    widens the whole tensor into a temporary (8 MB per million values) and then adds it, two passes over memory
    where this makes one (1.6 -> 1.2 ms per 1.1M float32 values here). The same kernel adds the same float64
    values: the sums are bit-identical to ``add_``'s (tests/unit/test_aggregation_speed_paths.py). Anything else
    (another device, the same dtype, a small tensor, shapes that differ: torch's error or broadcast) is ``add_``."""
    if (
        total.device.type != "cpu"
        or update.dtype == total.dtype
        or update.numel() <= WIDEN_CHUNK
        or update.shape != total.shape
    ):
        total.add_(update, alpha=alpha)
        return
    into, flat = total.view(-1), update.reshape(-1)
    buffer = torch.empty(WIDEN_CHUNK, dtype=total.dtype)
    for start in range(0, flat.numel(), WIDEN_CHUNK):
        part = buffer[: min(WIDEN_CHUNK, flat.numel() - start)]
        part.copy_(flat[start : start + WIDEN_CHUNK])  # widened exactly
        into[start : start + part.numel()].add_(part, alpha=alpha)


def accumulation_device(name: str) -> torch.device:
    """The torch device the worker sums on ("cpu", "cuda", "cuda:N"); ``ValueError`` naming the setting if this
    machine cannot provide it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"aggregator_device {name!r} is not a torch device (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"aggregator_device {name!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(
            f"aggregator_device is {name!r} but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); set FEDCOMPUTE_AGGREGATOR_DEVICE=cpu or start the worker on a GPU"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"aggregator_device is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


class StreamingMean:
    """The weighted sum, kept in float64 on ``device``; ``mean`` returns float32 tensors on the CPU."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._device = torch.device(device)
        self._sum: dict[str, torch.Tensor] = {}
        self._weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        if not weight > 0:
            raise ValueError("weight must be positive")
        if self._sum and set(update) != set(self._sum):
            raise ValueError("update tensors differ from the first contribution's")
        for name, tensor in update.items():
            moved = tensor.to(self._device, non_blocking=True)
            total = self._sum.get(name)
            if total is None:
                total = self._sum[name] = torch.zeros(moved.shape, dtype=torch.float64, device=self._device)
            accumulate(total, moved, weight)
        self._weight += weight
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no contribution was added")
        return {k: (v / self._weight).to("cpu", torch.float32).contiguous() for k, v in self._sum.items()}


class MetricMean:
    """Example-weighted means of the metrics contributions report (each metric over those that reported it)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self.examples = 0

    def add(self, metrics: Mapping[str, float], examples: int) -> None:
        for name, value in metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + value * examples
            self._weights[name] = self._weights.get(name, 0.0) + examples
        self.examples += examples

    def means(self) -> dict[str, float]:
        return {name: total / self._weights[name] for name, total in sorted(self._sums.items())}
