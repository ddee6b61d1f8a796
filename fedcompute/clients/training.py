"""Local training and evaluation as a plan says: its program, loss, optimizer, epochs, batch size and metrics.

A device loads the plan's program with the global weights (``programs.load_module``: no pickle, no code from the
server), trains on its examples and returns the weight delta (new minus old, per parameter), its example count
and its metrics on its own data, which go inside the encrypted envelope. Shuffling uses a
:class:`torch.Generator` seeded per call; global torch RNG state and thread settings are left untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional

from fedcompute.clients.dataset import Split
from fedcompute.core.plans import Plan
from fedcompute.core.programs import load_module


@dataclass(frozen=True)
class LocalResult:
    delta: dict[str, torch.Tensor]  # new - old per parameter, float32, contiguous (empty when evaluating)
    examples: int
    metrics: dict[str, float]


def tensors(plan: Plan, data: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as the plan's input and label tensors (dtypes from the plan)."""
    features = torch.as_tensor(np.asarray(data.features), dtype=torch.float32)
    dtype = torch.int64 if plan.labels.dtype == "int64" else torch.float32
    return features, torch.as_tensor(np.asarray(data.labels)).to(dtype)


def loss_of(plan: Plan, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if plan.loss == "cross_entropy":
        return functional.cross_entropy(out, labels)
    if plan.loss == "mse":
        return functional.mse_loss(out, labels.view_as(out))
    return functional.binary_cross_entropy_with_logits(out, labels.view_as(out))


def optimizer_for(plan: Plan, model: nn.Module) -> torch.optim.Optimizer:
    o = plan.optimizer
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps)
    return torch.optim.SGD(model.parameters(), lr=o.learning_rate, momentum=o.momentum)


def run_training(plan: Plan, model: nn.Module, data: Split, seed: int, epochs: int | None = None) -> int:
    """Mini-batch training as the plan says (``epochs`` overrides its epochs); returns the steps taken."""
    features, labels = tensors(plan, data)
    generator = torch.Generator().manual_seed(seed)
    optimizer = optimizer_for(plan, model)
    limit = plan.training.max_steps or None
    steps = 0  # an exported graph's train/eval behaviour (dropout) is fixed at export: no .train() here
    for _ in range(epochs or plan.training.epochs):
        order = torch.randperm(len(data), generator=generator)
        for batch in torch.split(order, plan.training.batch_size):
            if limit is not None and steps >= limit:
                return steps
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_of(plan, model(features[batch]), labels[batch]))
            optimizer.step()
            steps += 1
    return steps


def metrics_of(plan: Plan, model: nn.Module, data: Split) -> dict[str, float]:
    """The plan's metrics of ``model`` on ``data`` (AUC only where both classes occur); empty data: none."""
    if len(data) == 0:
        return {}
    features, labels = tensors(plan, data)
    with torch.no_grad():
        out: torch.Tensor = model(features)
        results: dict[str, float] = {}
        if "loss" in plan.metrics:
            results["loss"] = float(loss_of(plan, out, labels))
        if "accuracy" in plan.metrics:
            predicted = out.argmax(dim=1) if plan.loss == "cross_entropy" else (out.view(-1) > 0).to(labels.dtype)
            results["accuracy"] = float((predicted == labels.view(-1)).float().mean())
        if "auc" in plan.metrics and len(set(labels.view(-1).tolist())) == 2:
            results["auc"] = float(roc_auc_score(labels.view(-1).numpy(), out.view(-1).numpy()))
    return results


def train_local(plan: Plan, weights: Mapping[str, torch.Tensor], data: Split, seed: int) -> LocalResult:
    """Train from ``weights`` on a device's ``data`` (or only evaluate, for an evaluation plan)."""
    model = load_module(plan.program, weights)
    if plan.kind == "evaluation":
        return LocalResult({}, len(data), metrics_of(plan, model, data))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if len(data) > 0:
        run_training(plan, model, data, seed)
    after = model.state_dict()
    with torch.no_grad():
        delta = {name: (after[name] - before[name]).to(torch.float32).contiguous() for name in before}
    return LocalResult(delta, len(data), metrics_of(plan, model, data))


def evaluate(plan: Plan, weights: Mapping[str, torch.Tensor], data: Split) -> dict[str, float]:
    """The plan's metrics of ``weights`` on ``data``; ``ValueError`` if ``data`` is empty."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty split")
    return metrics_of(plan, load_module(plan.program, weights), data)


def train_central(
    plan: Plan, weights: Mapping[str, torch.Tensor], data: Split, epochs: int, seed: int
) -> dict[str, torch.Tensor]:
    """The centrally trained baseline: the plan's model from ``weights`` trained on all of ``data`` for ``epochs``."""
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    model = load_module(plan.program, weights)
    run_training(plan, model, data, seed, epochs=epochs)
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
