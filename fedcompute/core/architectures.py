"""Built-in models, turned into plans the same way a user's model is (``programs.build_plan``).

A task names one of these instead of sending a plan; the server builds the plan from it (once per process and
hyperparameters) and initialises its weights from the task's seed. Nothing else in the system knows these names.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from fedcompute.core.plans import ExampleSelector, Optimizer, Training


@dataclass(frozen=True)
class Architecture:
    """A built-in model: its id, a human summary, its input shape and a builder."""

    arch_id: str
    summary: str
    input_features: int
    num_classes: int
    builder: Callable[[], nn.Module]


def _mlp(*widths: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return build


ARCHITECTURES: dict[str, Architecture] = {
    a.arch_id: a
    for a in (
        Architecture("digits-mlp-v1", "MLP 64-64-10 for 8x8 handwritten digits", 64, 10, _mlp(64, 64, 10)),
        Architecture("digits-linear-v1", "softmax regression 64-10 for 8x8 digits", 64, 10, _mlp(64, 10)),
        Architecture(
            "bench-1m", "MLP 64-1024-1024-10 (1.13M parameters), for benchmarks", 64, 10, _mlp(64, 1024, 1024, 10)
        ),
        Architecture(
            "bench-10m", "MLP 64-3200-3072-10 (10.07M parameters), for size tests", 64, 10, _mlp(64, 3200, 3072, 10)
        ),
    )
}


def get_architecture(arch_id: str) -> Architecture:
    """Return the built-in or raise ``KeyError`` naming the known ids."""
    try:
        return ARCHITECTURES[arch_id]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown built-in model {arch_id!r}; known: {known} (or send a plan)") from None


_SEEDED = threading.Lock()


def build_model(arch_id: str, seed: int | None = None) -> nn.Module:
    """Build a fresh built-in model; with ``seed`` its initial weights are reproducible (global RNG untouched).
    Seeded builds take turns (``_SEEDED``): the layers draw their weights from torch's one global generator, so two
    threads building at once (two CreateTask calls) interleaved their draws, and each got weights of neither seed."""
    arch = get_architecture(arch_id)
    if seed is None:
        return arch.builder()
    with _SEEDED:
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            return arch.builder()
        finally:
            torch.random.set_rng_state(gen_state)


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, detached float32 copies of a model's parameters (safetensors-ready)."""
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}


@lru_cache(maxsize=32)
def builtin_plan(arch_id: str, epochs: int, batch_size: int, learning_rate: float, momentum: float) -> bytes:
    """The plan bytes of a built-in model with these local-training settings (exported once per process)."""
    from fedcompute.core.programs import build_plan

    arch = get_architecture(arch_id)
    plan, _ = build_plan(
        build_model(arch_id, seed=0),
        torch.zeros(2, arch.input_features),
        name=arch_id,
        loss="cross_entropy",
        optimizer=Optimizer("sgd", learning_rate, momentum=momentum),
        training=Training(epochs, batch_size, 0),
        metrics=("loss", "accuracy"),
        selector=ExampleSelector("digits"),
    )
    return plan.encode()
