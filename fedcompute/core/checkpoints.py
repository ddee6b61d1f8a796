"""Model weights and updates as safetensors (never pickle): encode and decode; plans check them (``plans``).

All metadata goes in one key so that the same tensors always give the same bytes (a stable content id).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcompute.core.architectures import build_model, state_dict_of

METADATA_KEY = "fedcompute"


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None) -> bytes:
    prepared = {k: v.detach().contiguous() for k, v in sorted(tensors.items())}
    meta = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)} if metadata else None
    return st_save(prepared, metadata=meta)


def decode(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; raise ``ValueError`` if they are not."""
    try:
        return st_load(data)
    except Exception as exc:
        raise ValueError(f"not a safetensors payload: {exc}") from None


# safetensors' dtype names for the dtypes a plan's schema may name (little-endian, as the format is)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER = 100_000_000  # the safetensors library's own bound on the JSON header
# the views below are read-only by contract (the aggregator only reads them); torch has no read-only tensor
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def decode_views(
    data: bytes, schema: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Safetensors bytes that hold exactly ``schema``'s tensors (names, shapes, dtypes), as tensors viewing
    ``data`` without a copy, and our metadata; ``ValueError`` unless the layout is one the safetensors library
    accepts too: a JSON object header, every tensor's offsets inside the data and its byte length its shape's,
    the tensors back to back from the data's start to the buffer's end. The tensors must not be written to."""
    header, header_len = _header(data)
    meta = _metadata(header.pop("__metadata__", None))
    if set(header) != set(schema):
        missing, extra = sorted(set(schema) - set(header))[:5], sorted(set(header) - set(schema))[:5]
        raise ValueError(f"tensor names do not match the plan: missing {missing}, unexpected {extra}")
    base, end, spans = 8 + header_len, 0, []
    for name, entry in header.items():
        shape, dtype = schema[name]
        begin, stop = _span(name, entry, shape, dtype)
        spans.append((begin, stop, name))
    for begin, stop, _ in sorted(spans):
        if begin != end:
            raise ValueError("not a safetensors payload: tensors overlap or leave a gap")
        end = stop
    if base + end != len(data):
        raise ValueError("not a safetensors payload: the tensors do not end where the buffer does")
    tensors = {}
    for begin, stop, name in spans:
        shape, dtype = schema[name]
        count = (stop - begin) // dtype.itemsize
        aligned = (base + begin) % dtype.itemsize == 0 and sys.byteorder == "little"
        if not count:
            flat = torch.empty(0, dtype=dtype)
        elif aligned:
            flat = torch.frombuffer(data, dtype=dtype, count=count, offset=base + begin)
        else:  # a writer that did not pad its header: one copy, aligned
            flat = torch.frombuffer(bytearray(data[base + begin : base + stop]), dtype=dtype, count=count)
        tensors[name] = flat.view(shape)
    return tensors, meta


def _span(name: str, entry: object, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int]:
    """A header entry's data offsets, checked against the schema's shape and dtype."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):  # others: ignored
        raise ValueError(f"not a safetensors payload: tensor {name!r} has a malformed entry")
    got_shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(got_shape, list) or not all(type(d) is int and d >= 0 for d in got_shape):
        raise ValueError(f"not a safetensors payload: tensor {name!r} has a malformed shape")
    got = (tuple(got_shape), _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None)
    if got != (shape, dtype):
        raise ValueError(f"tensor {name!r} is {got}, the plan needs {(shape, dtype)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ValueError(f"not a safetensors payload: tensor {name!r} has malformed data offsets")
    begin, stop = offsets
    if not 0 <= begin <= stop or stop - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"not a safetensors payload: tensor {name!r}'s data offsets do not fit its shape")
    return begin, stop


def _metadata(raw: object) -> dict[str, object]:
    """Our metadata from the header's ``__metadata__`` (a map of strings, as safetensors requires)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError("not a safetensors payload: __metadata__ is not a map of strings")
    if METADATA_KEY not in raw:
        return {}
    try:
        meta = json.loads(raw[METADATA_KEY])
    except ValueError:
        raise ValueError("fedcompute metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise ValueError("fedcompute metadata is not an object")
    return meta


def decode_metadata(data: bytes) -> dict[str, object]:
    """The JSON metadata stored under our single key (empty if none); ``ValueError`` if the header is not one."""
    return _metadata(_header(data)[0].get("__metadata__"))


def _header(data: bytes) -> tuple[dict[str, object], int]:
    """The safetensors JSON header as an object, and its length; ``ValueError`` unless it is one the safetensors
    library reads too (a length inside the data, UTF-8, starting with "{")."""
    if len(data) < 8:
        raise ValueError("not a safetensors payload: too short")
    header_len = int.from_bytes(data[:8], "little")
    if not 0 < header_len <= min(_MAX_HEADER, len(data) - 8):
        raise ValueError("not a safetensors payload: bad header length")
    raw = memoryview(data)[8 : 8 + header_len].tobytes()
    try:
        header = json.loads(raw.decode("utf-8")) if raw.startswith(b"{") else None  # as the library: UTF-8, "{"
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not a safetensors payload: the header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors payload: the header is not an object")
    return header, header_len


def initial_weights(arch_id: str, seed: int) -> dict[str, torch.Tensor]:
    return state_dict_of(build_model(arch_id, seed=seed))
