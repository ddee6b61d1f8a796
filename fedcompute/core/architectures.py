"""Registry of model architectures a plan may name.

Plans are declarative: they name an architecture id from this registry and never carry code. The server,
the model updater, the device simulator and the demo all build models through :func:`build_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """A registered model architecture: its id, a human summary, its input shape and a builder."""

    arch_id: str
    summary: str
    input_features: int
    num_classes: int
    builder: Callable[[], nn.Module]


def _digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _digits_linear() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 10))


ARCHITECTURES: dict[str, Architecture] = {
    a.arch_id: a
    for a in (
        Architecture("digits-mlp-v1", "MLP 64-64-10 for 8x8 handwritten digits", 64, 10, _digits_mlp),
        Architecture("digits-linear-v1", "softmax regression 64-10 for 8x8 digits", 64, 10, _digits_linear),
    )
}


def get_architecture(arch_id: str) -> Architecture:
    """Return the registered architecture or raise ``KeyError`` naming the known ids."""
    try:
        return ARCHITECTURES[arch_id]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown model architecture {arch_id!r}; known: {known}") from None


def build_model(arch_id: str, seed: int | None = None) -> nn.Module:
    """Build a fresh model; with ``seed`` its initial weights are reproducible."""
    arch = get_architecture(arch_id)
    if seed is None:
        return arch.builder()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return arch.builder()
    finally:
        torch.random.set_rng_state(gen_state)


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, detached float32 copies of a model's parameters (safetensors-ready)."""
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
