"""Model weights and updates as safetensors (never pickle): encode and decode; plans check them (``plans``).

All metadata goes in one key so that the same tensors always give the same bytes (a stable content id).
"""

from __future__ import annotations

import json
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


def decode_metadata(data: bytes) -> dict[str, object]:
    """The JSON metadata stored under our single key (empty if none)."""
    if len(data) < 8:
        raise ValueError("not a safetensors payload: too short")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise ValueError("not a safetensors payload: bad header length")
    header = json.loads(data[8 : 8 + header_len])
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        return {}
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("fedcompute metadata is not an object")
    return meta


def initial_weights(arch_id: str, seed: int) -> dict[str, torch.Tensor]:
    return state_dict_of(build_model(arch_id, seed=seed))
