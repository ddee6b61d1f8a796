"""A user's model for `fedcompute demo --model examples/wide_mlp.py:build` (or `task create --model ...`).

This file is not part of the fedcompute package and need not be installed: the TaskBuilder imports it on the
operator's machine, exports the model with torch.export and ships only the exported graph. Devices and servers never
run this code.

The function returns the model and an example input batch (8x8 digits: 64 features, 10 classes).
"""

from __future__ import annotations

import torch
from torch import nn


def build() -> tuple[nn.Module, torch.Tensor]:
    """An MLP 64-1024-1024-10: 1,126,410 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )
    return model, torch.zeros(8, 64)
