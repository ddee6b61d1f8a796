"""The task builder: a team's PyTorch model -> a checked plan v2 and initial weights -> a task.

``fedcompute task create --model PATH_OR_MODULE:FUNCTION``, ``fedcompute demo --model …`` and notebooks
(``fedcompute.TaskBuilder``) come through here. The function returns the ``nn.Module`` and an example input batch
(optionally also example labels). The builder exports the model (``torch.export``, batch dimension dynamic), checks
that the exported program trains one step and evaluates on the example batch, and reports the parameter count and
plan size; all before anything is registered or stored. The user's code runs here, on the operator's machine, never
on a server or a device: they receive the exported graph only.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedcompute.clients.dataset import Split
from fedcompute.clients.training import metrics_of, run_training
from fedcompute.core import checkpoints, plans, programs
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.plans import ExampleSelector, Optimizer, Plan, Training
from fedcompute.v1 import task_management_pb2 as tm

if TYPE_CHECKING:
    from fedcompute.core.settings import Settings


class BuildError(ValueError):
    """The model cannot become a plan; the message says why."""


@dataclass(frozen=True)
class BuiltPlan:
    plan: Plan
    plan_bytes: bytes
    initial_weights: bytes  # safetensors of the model's parameters and buffers
    parameter_count: int

    def summary(self) -> str:
        return (
            f"model {self.plan.name!r}: {self.parameter_count:,} parameters in {len(self.plan.parameters)} tensors; "
            f"plan {len(self.plan_bytes):,} bytes; weights {len(self.initial_weights):,} bytes"
        )


def load_model_function(ref: str) -> Callable[[], object]:
    """``path/to/file.py:function`` (a file that need not be installed) or ``package.module:function``."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name:
        raise BuildError(f"--model must look like PATH.py:FUNCTION or MODULE:FUNCTION, got {ref!r}")
    try:
        if target.endswith(".py") or Path(target).is_file():
            path = Path(target).resolve()
            spec = importlib.util.spec_from_file_location(f"fedcompute_user_model_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise BuildError(f"cannot load {target!r} as Python")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except (OSError, ImportError, SyntaxError) as exc:
        raise BuildError(f"cannot load {target!r}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise BuildError(f"{target!r} has no function {name!r}")
    return function  # type: ignore[no-any-return]


@dataclass
class TaskBuilder:
    """Build a task from a model. ``TaskBuilder.from_function(ref)`` or ``TaskBuilder(module, example)``."""

    module: nn.Module
    example: torch.Tensor
    example_labels: torch.Tensor | None = None
    name: str = "model"
    loss: str = "cross_entropy"
    optimizer: Optimizer = field(default_factory=lambda: Optimizer("sgd", 0.1, momentum=0.9))
    training: Training = field(default_factory=Training)
    metrics: tuple[str, ...] = ("loss", "accuracy")
    example_selector: ExampleSelector = field(default_factory=lambda: ExampleSelector("digits"))
    kind: str = "training"

    @classmethod
    def from_function(cls, ref: str, **options: object) -> TaskBuilder:
        made = load_model_function(ref)()
        parts: Sequence[object] = made if isinstance(made, tuple) else (made,)
        if len(parts) not in (2, 3) or not isinstance(parts[0], nn.Module) or not isinstance(parts[1], torch.Tensor):
            raise BuildError(f"{ref} must return (nn.Module, example input batch[, example labels])")
        labels = parts[2] if len(parts) == 3 and isinstance(parts[2], torch.Tensor) else None
        name = ref.rpartition(":")[0].rpartition("/")[2].removesuffix(".py").rpartition(".")[2] or "model"
        return cls(parts[0], parts[1], labels, **{"name": name, **options})  # type: ignore[arg-type]

    def build(self) -> BuiltPlan:
        """Export and check; ``BuildError`` with the reason if the model cannot be a plan."""
        if not any(p.requires_grad for p in self.module.parameters()):
            raise BuildError("the model has no trainable parameters")
        try:
            plan, weights = programs.build_plan(
                self.module,
                self.example,
                name=self.name,
                loss=self.loss,
                optimizer=self.optimizer,
                training=self.training,
                metrics=self.metrics,
                selector=self.example_selector,
                kind=self.kind,
            )
        except (ValueError, InvalidArgument) as exc:
            raise BuildError(str(exc)) from None
        self._check_runs(plan, weights)
        plan_bytes = plan.encode()
        return BuiltPlan(plan, plan_bytes, checkpoints.encode(weights), plan.parameter_count())

    def _check_runs(self, plan: Plan, weights: dict[str, torch.Tensor]) -> None:
        """The exported program, loaded as a device loads it, trains one step and evaluates on the example."""
        data = Split(self.example.detach().to(torch.float32).numpy(), self._labels(plan).numpy())
        try:
            model = programs.load_module(plan.program, weights)
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            run_training(replace(plan, training=Training(1, len(data), 1)), model, data, seed=0)
            after = model.state_dict()
            results = metrics_of(plan, model, data)
        except Exception as exc:  # whatever torch raises, the operator needs the reason
            raise BuildError(f"the exported model does not train a step: {type(exc).__name__}: {exc}") from None
        if all(torch.equal(before[k], after[k]) for k in before):
            raise BuildError("one training step on the example batch changed no parameter (no gradient flows)")
        if not all(math.isfinite(v) for v in results.values()):
            raise BuildError(f"evaluating on the example batch gave non-finite metrics {results}")

    def _labels(self, plan: Plan) -> torch.Tensor:
        n = self.example.shape[0]
        if self.example_labels is not None:
            return self.example_labels
        if plan.labels.dtype == "int64":  # cross-entropy: class indices below the output width
            with torch.no_grad():
                classes = int(self.module(self.example).shape[-1])
            return torch.arange(n) % max(classes, 1)
        return (
            (torch.arange(n * math.prod(plan.labels.shape[1:])) % 2).to(torch.float32).view(n, *plan.labels.shape[1:])
        )

    def spec(self, built: BuiltPlan, **fields: object) -> tm.TaskSpec:
        """A TaskSpec carrying the plan and initial weights; ``fields`` are the TaskSpec's other fields."""
        kind = tm.TASK_KIND_EVALUATION if self.kind == "evaluation" else tm.TASK_KIND_TRAINING
        return tm.TaskSpec(plan=built.plan_bytes, initial_weights=built.initial_weights, kind=kind, **fields)  # type: ignore[arg-type]

    def create(self, settings: Settings | None = None, **fields: object) -> tm.Task:
        """Build, check, and create the task as the operator (``fedcompute task create --model`` does the same):
        register its access policy with every key service, then create it at ``settings.server_address``.
        ``settings`` defaults to the ``FEDCOMPUTE_*`` environment (FEDCOMPUTE_OPERATOR_TOKEN: an operator token);
        ``fields`` are the TaskSpec's other fields."""
        from fedcompute.attestation.measure import measure
        from fedcompute.clients.dealer import operator_key_clients
        from fedcompute.clients.operator import create_task
        from fedcompute.clients.typed import TaskManagementClient
        from fedcompute.core.secrets import key_admin_token
        from fedcompute.core.settings import Settings
        from fedcompute.keys.trust import load_trusted
        from fedcompute.rpc.channels import channel_for

        settings = settings or Settings()
        built = self.build()
        check_plan_size(built, settings.max_plan_bytes)
        return create_task(
            TaskManagementClient(
                channel_for(settings, settings.server_address), settings.rpc_timeout_s, settings.operator_token
            ),
            operator_key_clients(settings, key_admin_token(settings)),
            load_trusted(settings.trusted_providers_path()),
            settings.threshold,
            self.spec(built, **fields),
            settings.allowed_measurements or [measure()],
        )


def check_plan_size(built: BuiltPlan, max_bytes: int) -> None:
    """Refuse locally what the server would refuse (``InvalidArgument`` with the limit)."""
    plans.parse(built.plan_bytes, max_bytes=max_bytes, where="spec.plan")


def evaluation_spec(plan_bytes: bytes, weights: bytes, **fields: object) -> tm.TaskSpec:
    """An EVALUATION task of a published model: the training task's plan as an evaluation plan, and the version's
    weights (checked against the plan's schema here, and again by the server)."""
    plan = plans.parse(plan_bytes, max_bytes=len(plan_bytes) + 1)
    try:
        plans.check_tensors(plan.schema(), checkpoints.decode(weights))
    except ValueError as exc:
        raise BuildError(f"the checkpoint does not fit the plan: {exc}") from None
    evaluation = replace(plan, kind="evaluation").encode()
    return tm.TaskSpec(plan=evaluation, initial_weights=weights, kind=tm.TASK_KIND_EVALUATION, **fields)  # type: ignore[arg-type]
