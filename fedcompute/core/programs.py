"""Models as ``torch.export`` programs: export a module, check a program from elsewhere, load it without pickle.

A program is the JSON half of torch's export serialization (the graph and its signature); weights never travel in
it. Loading builds the graph from JSON with the weights handed in as tensors and no sample inputs, so ``torch.load``
(pickle) is never reached. torch's own loader (``torch.export.load``) unpickles the archive's sample inputs and, with
them, turns the program's ``guards_code`` strings into Python through ``exec``; node metadata (stack traces) ends up
in generated source. So before anything is deserialized :func:`check_program` refuses guards, refuses operators
outside core ATen, refuses names that are not identifiers, and drops every node's metadata; the module is built
with ``check_guards=False``. What this does not protect against: a bug in an ATen kernel or in torch's deserializer
itself; a device that runs untrusted plans should also sandbox the process.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedcompute.core.errors import InvalidArgument
from fedcompute.core.plans import PARAMETER_DTYPES, ExampleSelector, Optimizer, Plan, TensorSpec, Training, parse

ALLOWED_TARGET_PREFIX = "torch.ops.aten."
ALLOWED_TARGETS = frozenset({"_operator.getitem"})
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STATE_KINDS = ("parameter", "buffer")
_DESERIALIZING = threading.Lock()  # torch's deserializer keeps its state in a module global: one at a time


@dataclass(frozen=True)
class Exported:
    program: bytes
    schema_version: str
    torch_version: str
    parameters: tuple[TensorSpec, ...]
    input: TensorSpec
    weights: dict[str, torch.Tensor]


def export(module: nn.Module, example: torch.Tensor, input_name: str = "x") -> Exported:
    """Export ``module``'s forward pass on ``example`` (batch dimension dynamic); ``ValueError`` with the reason."""
    from torch._export.serde import serialize

    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 2:
        raise ValueError("the example input must be one tensor with a batch dimension of at least 2 examples")
    try:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        artifact = serialize.serialize(
            program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
        )
    except Exception as exc:  # torch raises many kinds; the operator needs the message
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"the model does not export with torch.export: {type(exc).__name__}: {first}") from None
    if program.constants:
        names = sorted(program.constants)[:3]
        raise ValueError(f"the model has tensor constants or non-persistent buffers ({names}); plans carry none")
    weights = {k: v.detach().contiguous().clone() for k, v in program.state_dict.items()}
    bad = [
        f"{k} ({v.dtype})" for k, v in weights.items() if str(v.dtype).removeprefix("torch.") not in PARAMETER_DTYPES
    ]
    if bad:
        raise ValueError(f"every parameter and buffer must be float32; not so: {bad[:3]}")
    if not weights:
        raise ValueError("the model has no parameters")
    doc = json.loads(artifact.exported_program)
    _strip(doc)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    check_program(text)
    return Exported(
        program=text,
        schema_version=_schema_version(doc),
        torch_version=str(torch.__version__).split("+")[0],
        parameters=tuple(TensorSpec(k, "float32", tuple(v.shape)) for k, v in sorted(weights.items())),
        input=TensorSpec(input_name, str(example.dtype).removeprefix("torch."), (-1, *example.shape[1:])),
        weights=weights,
    )


def check_program(program: bytes, where: str = "plan.program") -> dict[str, Any]:
    """Refuse a program that is not safe to deserialize here; return its JSON document, metadata dropped."""
    from torch._export.serde.schema import SCHEMA_VERSION

    try:
        doc = json.loads(program)
        graph = doc["graph_module"]["graph"]
        nodes = graph["nodes"]
        major = int(doc["schema_version"]["major"])
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(f"{where}.exported_program", "is not a torch.export program (JSON)") from None
    if major != SCHEMA_VERSION[0]:
        raise InvalidArgument(
            f"{where}.schema_version", f"is {major}.x; this device reads torch.export schema {SCHEMA_VERSION[0]}.x"
        )
    if doc.get("guards_code"):
        raise InvalidArgument(f"{where}.exported_program", "carries guards code; plans may not carry Python")
    for node in nodes:
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str) or not (target.startswith(ALLOWED_TARGET_PREFIX) or target in ALLOWED_TARGETS):
            raise InvalidArgument(
                f"{where}.exported_program", f"calls {target!r}; only core ATen operators are allowed"
            )
    if doc.get("graph_module", {}).get("module_call_graph") is None:
        raise InvalidArgument(f"{where}.exported_program", "has no module call graph")
    _check_names(doc, where)
    _strip(doc)
    checked: dict[str, Any] = doc
    return checked


def load_module(program: bytes, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build the program's module holding ``weights`` (copied), ready to train with any optimizer.

    Raises ``InvalidArgument`` if the program is refused or the weights do not fit it."""
    from torch._export.serde import schema, serialize

    doc = check_program(program)
    kinds = _state_kinds(doc)
    if set(kinds) != set(weights):
        raise InvalidArgument("checkpoint", "its tensors are not the program's parameters and buffers")
    state: dict[str, torch.Tensor] = {}
    for name, kind in kinds.items():
        tensor = weights[name].detach().clone()
        state[name] = nn.Parameter(tensor) if kind == "parameter" else tensor
    try:
        with _DESERIALIZING:
            parsed = serialize._dict_to_dataclass(schema.ExportedProgram, doc)  # type: ignore[no-untyped-call]
            program_ = serialize.ExportedProgramDeserializer().deserialize(parsed, state, {}, None)
            module: nn.Module = program_.module(check_guards=False)
    except InvalidArgument:
        raise
    except Exception as exc:
        raise InvalidArgument("plan.program", f"does not load: {type(exc).__name__}: {exc}") from None
    return module


def _state_kinds(doc: dict[str, Any]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for spec in doc["graph_module"]["signature"]["input_specs"]:
        for kind in STATE_KINDS:
            if kind in spec:
                name = spec[kind].get("parameter_name" if kind == "parameter" else "buffer_name")
                kinds[str(name)] = kind
        if any(k in spec for k in ("tensor_constant", "custom_obj", "constant_input", "token")):
            raise InvalidArgument("plan.program", "takes constants or custom objects; plans carry none")
    return kinds


def _check_names(value: object, where: str) -> None:
    """Every graph-level ``name`` must be a plain identifier (they end up in generated source)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "name" and isinstance(item, str) and item and not IDENTIFIER.match(item):
                raise InvalidArgument(f"{where}.exported_program", f"names a value {item[:40]!r}; not an identifier")
            _check_names(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_names(item, where)


def _strip(doc: dict[str, Any]) -> None:
    """Drop what only debugging needs and what could carry text into generated source."""
    graph_module = doc.get("graph_module", {})
    for node in graph_module.get("graph", {}).get("nodes", []):
        if isinstance(node, dict):
            node["metadata"] = {}
    if isinstance(graph_module, dict):
        graph_module["metadata"] = {}
    doc["guards_code"] = []


def _schema_version(doc: dict[str, Any]) -> str:
    version = doc.get("schema_version", {})
    return f"{version.get('major', 0)}.{version.get('minor', 0)}"


def build_plan(
    module: nn.Module,
    example: torch.Tensor,
    *,
    name: str,
    loss: str,
    optimizer: Optimizer,
    training: Training,
    metrics: tuple[str, ...],
    selector: ExampleSelector,
    kind: str = "training",
) -> tuple[Plan, dict[str, torch.Tensor]]:
    """The plan for ``module`` and its initial weights; ``ValueError`` naming what keeps it from being one.

    Built-in architectures and users' models alike come through here (the TaskBuilder adds its checks on top)."""
    exported = export(module, example)
    with torch.no_grad():
        out = module(example)
    if not isinstance(out, torch.Tensor):
        raise ValueError("the model's forward pass must return one tensor")
    labels = (
        TensorSpec("", "int64", (-1,)) if loss == "cross_entropy" else TensorSpec("", "float32", (-1, *out.shape[1:]))
    )
    plan = Plan(
        name=name,
        program=exported.program,
        program_schema_version=exported.schema_version,
        torch_version=exported.torch_version,
        parameters=exported.parameters,
        inputs=(exported.input,),
        labels=labels,
        loss=loss,
        optimizer=optimizer,
        training=training,
        metrics=metrics,
        example_selector=selector,
        kind=kind,
    )
    parse(plan.encode(), max_bytes=1 << 62)  # the same checks a server and a device apply
    return plan, exported.weights
