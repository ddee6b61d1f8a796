"""Streaming weighted FedAvg: one running float64 sum, never all contributions in memory at once."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class StreamingMean:
    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        if not weight > 0:
            raise ValueError("weight must be positive")
        if self._sum and set(update) != set(self._sum):
            raise ValueError("update tensors differ from the first contribution's")
        for name, tensor in update.items():
            scaled = tensor.to(torch.float64) * weight
            if name in self._sum:
                self._sum[name].add_(scaled)
            else:
                self._sum[name] = scaled
        self._weight += weight
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no contribution was added")
        return {k: (v / self._weight).to(torch.float32).contiguous() for k, v in self._sum.items()}


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
