"""Plan v2: what a device runs for a task, as data. Canonical JSON; the model is a ``torch.export`` program.

A plan carries the model's forward pass as an exported program (a graph of ATen operators, JSON, no weights, no
pickle), the loss, the optimizer, the local-training limits, the input and label specs, the metrics to report,
the example selector and the parameter schema (names, shapes, dtypes) every update must match. The weights travel
separately, as the task's safetensors checkpoint. ``parse`` refuses anything outside this format, naming the field;
the program itself is checked by :mod:`fedcompute.core.programs` before anything loads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedcompute.core.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

FORMAT = "fedcompute.plan"
FORMAT_VERSION = 2
MEDIA_TYPE = "application/vnd.fedcompute.plan.v2+json"
PROGRAM_FORMAT = "torch.export.json"
KINDS = ("training", "evaluation")
LOSSES = ("cross_entropy", "mse", "bce_with_logits")
OPTIMIZERS = ("sgd", "adam")
METRICS = ("loss", "accuracy", "auc")
DTYPES = ("float32", "int64")
PARAMETER_DTYPES = ("float32",)
MAX_NAME_CHARS = 128  # a plan's name (the model name a task keeps: its column's width)
DEFAULT_MAX_PLAN_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor's dtype and shape; ``-1`` marks the dynamic batch dimension of an input."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Optimizer:
    name: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.0  # sgd
    beta1: float = 0.9  # adam
    beta2: float = 0.999
    eps: float = 1e-8

    def as_json(self) -> dict[str, Any]:
        if self.name == "sgd":
            return {"name": "sgd", "learning_rate": self.learning_rate, "momentum": self.momentum}
        return {
            "name": self.name,
            "learning_rate": self.learning_rate,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
        }


@dataclass(frozen=True)
class Training:
    epochs: int = 5
    batch_size: int = 16
    max_steps: int = 0  # 0: no limit beyond the epochs


@dataclass(frozen=True)
class ExampleSelector:
    """Which of a device's example collections to read, and opaque criteria for its example store."""

    collection: str
    criteria: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    name: str
    program: bytes  # the torch.export program, JSON (torch's serde schema), without weights
    program_schema_version: str
    torch_version: str
    parameters: tuple[TensorSpec, ...]
    inputs: tuple[TensorSpec, ...]
    labels: TensorSpec
    loss: str
    optimizer: Optimizer
    training: Training
    metrics: tuple[str, ...]
    example_selector: ExampleSelector
    kind: str = "training"

    def encode(self) -> bytes:
        """The canonical bytes devices download and hash (sorted keys, no spaces, ASCII)."""
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "name": self.name,
            "program": {
                "format": PROGRAM_FORMAT,
                "schema_version": self.program_schema_version,
                "torch_version": self.torch_version,
                "exported_program": self.program.decode(),
            },
            "parameters": [p.as_json() for p in self.parameters],
            "inputs": [i.as_json() for i in self.inputs],
            "labels": self.labels.as_json(),
            "loss": self.loss,
            "optimizer": self.optimizer.as_json(),
            "training": {
                "epochs": self.training.epochs,
                "batch_size": self.training.batch_size,
                "max_steps": self.training.max_steps,
            },
            "metrics": list(self.metrics),
            "example_selector": {
                "collection": self.example_selector.collection,
                "criteria": dict(self.example_selector.criteria),
            },
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def schema(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Parameter name -> (shape, dtype): what every update and checkpoint of the task must hold exactly."""
        import torch  # here, not at import: key services and the dealer read policies and plans without torch

        return {p.name: (p.shape, getattr(torch, p.dtype)) for p in self.parameters}

    def parameter_count(self) -> int:
        return sum(math.prod(p.shape) for p in self.parameters)


def check_tensors(
    schema: Mapping[str, tuple[tuple[int, ...], torch.dtype]], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Raise ``ValueError`` unless the tensors' names, shapes and dtypes are exactly the schema's."""
    if set(schema) != set(tensors):
        missing = sorted(set(schema) - set(tensors))[:5]
        extra = sorted(set(tensors) - set(schema))[:5]
        raise ValueError(f"tensor names do not match the plan: missing {missing}, unexpected {extra}")
    for name, (shape, dtype) in schema.items():
        got = (tuple(tensors[name].shape), tensors[name].dtype)
        if got != (shape, dtype):
            raise ValueError(f"tensor {name!r} is {got}, the plan needs {(shape, dtype)}")


def parse(data: bytes, max_bytes: int = DEFAULT_MAX_PLAN_BYTES, where: str = "plan") -> Plan:
    """Parse plan bytes, refusing anything outside the format with ``InvalidArgument`` naming the field."""
    if len(data) > max_bytes:
        raise InvalidArgument(where, f"is {len(data)} bytes; the limit is {max_bytes} bytes (max_plan_bytes)")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            where, "is not a fedcompute plan (not JSON; pickled or zipped programs are refused)"
        ) from None
    r = _Reader(doc, where)
    if r.text("format") != FORMAT:
        raise InvalidArgument(f"{where}.format", f"must be {FORMAT!r}")
    version = r.integer("format_version")
    if version != FORMAT_VERSION:
        raise InvalidArgument(f"{where}.format_version", f"unknown format version {version}; this build reads 2")
    kind = r.choice("kind", KINDS)
    program = r.sub("program")
    if program.text("format") != PROGRAM_FORMAT:
        raise InvalidArgument(f"{where}.program.format", f"unknown program format; known: {PROGRAM_FORMAT}")
    opt = r.sub("optimizer")
    opt_name = opt.choice("name", OPTIMIZERS)
    optimizer = Optimizer(
        opt_name,
        opt.positive("learning_rate"),
        momentum=opt.fraction("momentum") if opt_name == "sgd" else 0.0,
        beta1=opt.fraction("beta1") if opt_name == "adam" else 0.9,
        beta2=opt.fraction("beta2") if opt_name == "adam" else 0.999,
        eps=opt.positive("eps") if opt_name == "adam" else 1e-8,
    )
    tr = r.sub("training")
    training = Training(tr.integer("epochs", low=1), tr.integer("batch_size", low=1), tr.integer("max_steps", low=0))
    metrics = tuple(r.strings("metrics"))
    for i, metric in enumerate(metrics):
        if metric not in METRICS:
            raise InvalidArgument(f"{where}.metrics[{i}]", f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    loss = r.choice("loss", LOSSES)
    if ("accuracy" in metrics and loss == "mse") or ("auc" in metrics and loss != "bce_with_logits"):
        raise InvalidArgument(f"{where}.metrics", "accuracy needs a classification loss, auc needs bce_with_logits")
    sel = r.sub("example_selector")
    criteria = sel.get("criteria", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in criteria.items()):
        raise InvalidArgument(f"{where}.example_selector.criteria", "must map strings to strings")
    parameters = tuple(_tensor_spec(p, f"{where}.parameters[{i}]", False) for i, p in enumerate(r.items("parameters")))
    if not parameters:
        raise InvalidArgument(f"{where}.parameters", "is empty: a model without parameters cannot be trained")
    if len({p.name for p in parameters}) != len(parameters):
        raise InvalidArgument(f"{where}.parameters", "names a tensor twice")
    inputs = tuple(_tensor_spec(p, f"{where}.inputs[{i}]", True) for i, p in enumerate(r.items("inputs")))
    if len(inputs) != 1:
        raise InvalidArgument(f"{where}.inputs", "must name exactly one input tensor (a batch of examples)")
    name = r.text("name")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidArgument(f"{where}.name", f"must be at most {MAX_NAME_CHARS} printable characters")
    return Plan(
        name=name,
        program=program.text("exported_program").encode(),
        program_schema_version=program.text("schema_version"),
        torch_version=program.text("torch_version"),
        parameters=parameters,
        inputs=inputs,
        labels=_tensor_spec(r.get("labels", dict), f"{where}.labels", True, named=False),
        loss=loss,
        optimizer=optimizer,
        training=training,
        metrics=metrics,
        example_selector=ExampleSelector(sel.text("collection"), dict(criteria)),
        kind=kind,
    )


def _tensor_spec(doc: object, where: str, batched: bool, named: bool = True) -> TensorSpec:
    r = _Reader(doc, where)
    dtypes = DTYPES if batched else PARAMETER_DTYPES
    shape = r.get("shape", list)
    low = -1 if batched else 0
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= low for d in shape):
        raise InvalidArgument(f"{where}.shape", f"must be a list of integers >= {low}")
    if batched and (not shape or shape[0] != -1 or -1 in shape[1:]):
        raise InvalidArgument(f"{where}.shape", "must start with -1 (the batch dimension) and have no other -1")
    return TensorSpec(r.text("name") if named else "", r.choice("dtype", dtypes), tuple(shape))


class _Reader:
    """Typed reads from one JSON object, each failure an ``InvalidArgument`` naming the field."""

    def __init__(self, doc: object, where: str) -> None:
        if not isinstance(doc, dict):
            raise InvalidArgument(where, "must be a JSON object")
        self._doc: dict[str, Any] = doc
        self._where = where

    def get(self, key: str, kind: type) -> Any:
        value = self._doc.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InvalidArgument(f"{self._where}.{key}", f"must be a {kind.__name__}")
        return value

    def text(self, key: str) -> str:
        value: str = self.get(key, str)
        return value

    def choice(self, key: str, known: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in known:
            raise InvalidArgument(f"{self._where}.{key}", f"unknown {key} {value!r}; known: {', '.join(known)}")
        return value

    def integer(self, key: str, low: int | None = None) -> int:
        value: int = self.get(key, int)
        if low is not None and value < low:
            raise InvalidArgument(f"{self._where}.{key}", f"must be >= {low}, got {value}")
        return value

    def number(self, key: str) -> float:
        value = self._doc.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidArgument(f"{self._where}.{key}", "must be a finite number")
        return float(value)

    def positive(self, key: str) -> float:
        value = self.number(key)
        if not value > 0:
            raise InvalidArgument(f"{self._where}.{key}", f"must be > 0, got {value}")
        return value

    def fraction(self, key: str) -> float:
        value = self.number(key)
        if not 0 <= value < 1:
            raise InvalidArgument(f"{self._where}.{key}", f"must be in [0, 1), got {value}")
        return value

    def items(self, key: str) -> list[Any]:
        value: list[Any] = self.get(key, list)
        return value

    def strings(self, key: str) -> list[str]:
        value = self.items(key)
        if not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{self._where}.{key}", "must be a list of strings")
        return value

    def sub(self, key: str) -> _Reader:
        return _Reader(self._doc.get(key), f"{self._where}.{key}")
