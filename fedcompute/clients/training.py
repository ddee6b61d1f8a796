"""Local training on a simulated device, evaluation, and the centrally trained baseline.

A device receives the global weights and a plan's local hyperparameters, runs mini-batch SGD with cross-entropy on
its own shard and reports the weight delta (new minus old) together with its example count, which is what the
server's federated averaging consumes. Shuffling uses a :class:`torch.Generator` seeded per call; global torch RNG
state and thread settings are left untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from fedcompute.clients.dataset import Split
from fedcompute.core.architectures import build_model, state_dict_of

DEFAULT_PLAN_HYPERPARAMETERS: dict[str, float | int] = {
    "local_epochs": 10,
    "batch_size": 16,
    "learning_rate": 0.1,
    "momentum": 0.9,
}
"""Local hyperparameters the demo plan uses (tuned for 20 non-IID devices, 16 reporting per round, 5 rounds)."""


def _plan_int(plan: Mapping[str, object], key: str) -> int:
    value = plan.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"plan key {key!r} must be a positive integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"plan key {key!r} must be a positive integer, got {value!r}")
    return int(value)


def _plan_float(plan: Mapping[str, object], key: str, default: float | None = None) -> float:
    value = plan.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"plan key {key!r} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TrainingConfig:
    """Local SGD hyperparameters; every value is checked on construction (``ValueError`` naming the key)."""

    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be positive, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not self.learning_rate > 0.0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    @classmethod
    def from_plan(cls, plan: Mapping[str, object]) -> TrainingConfig:
        """Read ``local_epochs``, ``batch_size``, ``learning_rate`` and optional ``momentum`` from a plan."""
        return cls(
            local_epochs=_plan_int(plan, "local_epochs"),
            batch_size=_plan_int(plan, "batch_size"),
            learning_rate=_plan_float(plan, "learning_rate"),
            momentum=_plan_float(plan, "momentum", 0.0),
        )


def _tensors(data: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of a split as torch tensors (float32 features, int64 labels)."""
    return torch.tensor(data.features, dtype=torch.float32), torch.tensor(data.labels, dtype=torch.int64)


def _model_with(arch_id: str, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A model of ``arch_id`` holding ``weights`` (a seed is passed so global RNG state stays untouched)."""
    model = build_model(arch_id, seed=0)
    model.load_state_dict(dict(weights), strict=True)
    return model


def _run_sgd(model: nn.Module, data: Split, config: TrainingConfig, epochs: int, seed: int) -> None:
    """Mini-batch SGD with cross-entropy for ``epochs`` passes over ``data``, reshuffled each pass."""
    features, labels = _tensors(data)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for batch in torch.split(order, config.batch_size):
            optimizer.zero_grad(set_to_none=True)
            logits: torch.Tensor = model(features[batch])
            torch.autograd.backward(functional.cross_entropy(logits, labels[batch]))
            optimizer.step()


def train_local(
    arch_id: str, weights: Mapping[str, torch.Tensor], data: Split, config: TrainingConfig, seed: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Train from ``weights`` on a device's ``data``; return (new - old per state-dict entry, example count).

    The deltas are contiguous float32 tensors keyed like the model's state dict. With no data the delta is zero.
    """
    model = _model_with(arch_id, weights)
    before = state_dict_of(model)
    if len(data) > 0:
        _run_sgd(model, data, config, config.local_epochs, seed)
    after = state_dict_of(model)
    with torch.no_grad():
        delta = {name: (after[name] - before[name]).contiguous() for name in before}
    return delta, len(data)


def evaluate(arch_id: str, weights: Mapping[str, torch.Tensor], data: Split) -> float:
    """Accuracy in [0, 1] of ``weights`` on ``data``; ``ValueError`` if ``data`` is empty."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty split")
    model = _model_with(arch_id, weights)
    features, labels = _tensors(data)
    model.eval()
    with torch.no_grad():
        logits: torch.Tensor = model(features)
        correct = int((logits.argmax(dim=1) == labels).sum().item())
    return correct / len(data)


def train_central(arch_id: str, data: Split, config: TrainingConfig, epochs: int, seed: int) -> dict[str, torch.Tensor]:
    """The centrally trained baseline: a model initialised from ``seed`` trained on all of ``data`` for ``epochs``.

    ``config.local_epochs`` is ignored in favour of ``epochs``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    model = build_model(arch_id, seed=seed)
    _run_sgd(model, data, config, epochs, seed)
    return state_dict_of(model)
