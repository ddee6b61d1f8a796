"""fedcompute: a federated-compute server suite (see docs/architecture.md).

``fedcompute.TaskBuilder`` (the team's model -> a checked plan and a task) is imported on first use, so that
``import fedcompute`` stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["TaskBuilder", "__version__"]

if TYPE_CHECKING:
    from fedcompute.clients.builder import TaskBuilder


def __getattr__(name: str) -> object:
    if name == "TaskBuilder":
        from fedcompute.clients.builder import TaskBuilder

        return TaskBuilder
    raise AttributeError(f"module 'fedcompute' has no attribute {name!r}")
