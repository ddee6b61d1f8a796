"""Plan v2 and exported programs: the format, its refusals, and that loading a plan never runs the server's code."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedcompute.clients.builder import BuildError, TaskBuilder
from fedcompute.clients.dataset import Split
from fedcompute.clients.training import run_training, train_local
from fedcompute.core import plans, programs
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.tasks import TaskSpec


def _built(**options: Any) -> tuple[plans.Plan, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    built = TaskBuilder(module, torch.zeros(4, 64), name="small", **options).build()
    from fedcompute.core import checkpoints

    return plans.parse(built.plan_bytes), checkpoints.decode(built.initial_weights)


def _doc(plan: plans.Plan) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(plan.encode())
    return doc


def _bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


class _Boom:
    """A pickle that would create a file when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_plan_round_trips_canonically_and_names_its_schema() -> None:
    plan, weights = _built()
    data = plan.encode()
    again = plans.parse(data)
    assert again == plan
    assert again.encode() == data  # canonical: the hash devices bind is stable
    assert plan.parameter_count() == 64 * 32 + 32 + 32 * 10 + 10
    plans.check_tensors(plan.schema(), weights)
    with pytest.raises(ValueError, match="do not match"):
        plans.check_tensors(plan.schema(), {"0.weight": weights["0.weight"]})
    with pytest.raises(ValueError, match="needs"):
        plans.check_tensors(plan.schema(), {**weights, "0.bias": torch.zeros(31)})


@pytest.mark.parametrize(
    ("path", "value", "field", "named"),
    [
        (("loss",), "hinge", "plan.loss", "hinge"),
        (("optimizer", "name"), "lbfgs", "plan.optimizer.name", "lbfgs"),
        (("metrics",), ["loss", "f1"], "plan.metrics[1]", "f1"),
        (("format_version",), 3, "plan.format_version", "3"),
        (("kind",), "inference", "plan.kind", "inference"),
        (("program", "format"), "torchscript", "plan.program.format", "torch.export"),
        (("training", "batch_size"), 0, "plan.training.batch_size", ">= 1"),
        (("optimizer", "learning_rate"), float("nan"), "plan.optimizer.learning_rate", "finite"),
        (("parameters",), [], "plan.parameters", "without parameters"),
    ],
)
def test_bad_plans_are_refused_naming_the_field(path: tuple[str, ...], value: object, field: str, named: str) -> None:
    doc = _doc(_built()[0])
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(InvalidArgument) as info:
        plans.parse(_bytes(doc))
    assert info.value.field == field
    assert named in str(info.value)


def test_a_plan_over_the_limit_is_refused_with_the_limit() -> None:
    data = _built()[0].encode()
    with pytest.raises(InvalidArgument, match=f"the limit is {len(data) - 1} bytes"):
        plans.parse(data, max_bytes=len(data) - 1)


def test_a_pickled_plan_is_refused_and_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = [pickle.dumps(_Boom(marker))]
    buffer = io.BytesIO()  # torch's own archive: its sample inputs are a pickle
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data/sample_inputs/model.pt", pickle.dumps(_Boom(marker)))
    payloads.append(buffer.getvalue())
    for payload in payloads:
        with pytest.raises(InvalidArgument, match="pickled or zipped programs are refused"):
            plans.parse(payload)
    doc = _doc(_built()[0])
    doc["program"]["exported_program"] = pickle.dumps(_Boom(marker)).decode("latin-1")
    with pytest.raises(InvalidArgument, match=r"not a torch\.export program"):
        programs.check_program(plans.parse(_bytes(doc)).program)
    assert not marker.exists()


def _program_doc() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    plan, weights = _built()
    doc: dict[str, Any] = json.loads(plan.program)
    return doc, weights


def test_a_program_carrying_python_is_refused_before_torch_sees_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    doc, weights = _program_doc()
    doc["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]  # torch.export.load would exec this
    with pytest.raises(InvalidArgument, match="guards code"):
        programs.load_module(json.dumps(doc).encode(), weights)
    doc, weights = _program_doc()
    doc["graph_module"]["graph"]["nodes"][0]["target"] = "builtins.exec"
    with pytest.raises(InvalidArgument, match="only core ATen operators"):
        programs.load_module(json.dumps(doc).encode(), weights)
    doc, weights = _program_doc()
    doc["graph_module"]["graph"]["nodes"][0]["outputs"][0]["as_tensor"]["name"] = "x = __import__('os')\n"
    with pytest.raises(InvalidArgument, match="not an identifier"):
        programs.load_module(json.dumps(doc).encode(), weights)
    doc, weights = _program_doc()
    doc["graph_module"]["graph"]["nodes"][0]["metadata"] = {"stack_trace": "\nimport os; os.system('x')\n"}
    assert programs.check_program(json.dumps(doc).encode())["graph_module"]["graph"]["nodes"][0]["metadata"] == {}
    assert not marker.exists()


def test_a_loaded_program_trains_with_any_batch_size_and_keeps_the_names() -> None:
    plan, weights = _built(optimizer=plans.Optimizer("adam", 0.01))
    model = programs.load_module(plan.program, weights)
    assert set(model.state_dict()) == set(weights)
    data = Split(torch.rand(33, 64).numpy(), (torch.arange(33) % 10).numpy())
    steps = run_training(plan, model, data, seed=0)
    assert steps == plan.training.epochs * 3  # batches of 16, 16, 1: the batch dimension is dynamic
    result = train_local(plan, weights, data, seed=0)
    plans.check_tensors(plan.schema(), result.delta)
    assert any(float(d.abs().max()) > 0 for d in result.delta.values())
    assert set(result.metrics) == {"loss", "accuracy"}
    with pytest.raises(InvalidArgument, match="not the program's"):
        programs.load_module(plan.program, {"0.weight": weights["0.weight"]})


def test_evaluation_plans_report_metrics_and_no_update() -> None:
    plan, weights = _built(kind="evaluation", loss="cross_entropy")
    data = Split(torch.rand(8, 64).numpy(), (torch.arange(8) % 10).numpy())
    result = train_local(plan, weights, data, seed=0)
    assert result.delta == {}
    assert result.examples == 8
    assert set(result.metrics) == {"loss", "accuracy"}


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        if x.sum() > 0:  # control flow on data: not exportable
            return out
        return -out


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x).detach() + x[:, :10]
        return out


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (_DataDependent(), "does not export"),
        (_Detached(), "does not train a step"),
        (nn.ReLU(), "no trainable parameters"),
        (nn.Sequential(nn.Linear(64, 4), nn.BatchNorm1d(4)), "must be float32"),
    ],
)
def test_the_builder_refuses_a_model_that_cannot_be_a_plan(module: nn.Module, reason: str) -> None:
    with pytest.raises(BuildError, match=reason):
        TaskBuilder(module, torch.rand(4, 64)).build()


def test_metrics_must_suit_the_loss() -> None:
    with pytest.raises(BuildError, match="auc needs bce_with_logits"):
        TaskBuilder(nn.Linear(64, 10), torch.rand(4, 64), metrics=("auc",)).build()


def test_a_model_file_outside_the_package_builds(tmp_path: Path) -> None:
    source = tmp_path / "team_model.py"
    source.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make():\n    return nn.Sequential(nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 1)), torch.zeros(4, 30)\n"
    )
    builder = TaskBuilder.from_function(f"{source}:make", loss="bce_with_logits", metrics=("loss", "auc"))
    built = builder.build()
    assert built.plan.name == "team_model"
    assert built.parameter_count == 30 * 8 + 8 + 8 + 1
    assert built.plan.labels == plans.TensorSpec("", "float32", (-1, 1))
    with pytest.raises(BuildError, match="has no function"):
        TaskBuilder.from_function(f"{source}:missing")
    with pytest.raises(BuildError, match="must look like"):
        TaskBuilder.from_function(str(source))


def test_the_builder_is_importable_from_the_package_root() -> None:
    import fedcompute

    assert fedcompute.TaskBuilder is TaskBuilder
    with pytest.raises(AttributeError):
        _ = fedcompute.NoSuchThing


def test_built_in_models_are_plans_built_the_same_way() -> None:
    spec = TaskSpec("pop", "bench-1m", rounds=1, report_goal=1, max_cohort=1)
    plan = plans.parse(spec.plan_bytes())
    assert plan.name == "bench-1m"
    assert plan.parameter_count() == 1_126_410
    assert spec.plan_bytes() == spec.plan_bytes()  # built once per process and settings
