"""The aggregator decodes a payload as tensors viewing the decrypted bytes (checkpoints.decode_views), checked
against the plan's schema on the way. Whatever it accepts, the safetensors library accepts too, with the same
values and metadata, and the schema check passes; what our encoder writes it accepts without a copy; each
malformed layout is refused with ValueError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedcompute.core import checkpoints
from fedcompute.core.plans import check_tensors

SCHEMA = {
    "w": ((3, 4), torch.float32),
    "b": ((4,), torch.float32),
    "n": ((2,), torch.int64),
    "e": ((0,), torch.float32),
}
TENSORS = {
    "w": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
    "b": torch.tensor([1.5, -2.0, 0.0, 3.25]),
    "n": torch.tensor([7, -9]),
    "e": torch.zeros(0),
}


REFUSAL = r"not a safetensors payload|tensor names do not match the plan|tensor '.' is |fedcompute metadata is not"


def _payload(header: dict[str, object], data: bytes, pad: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(raw)) + raw + data


def _layout() -> tuple[dict[str, object], bytes]:
    """The header and data our encoder writes for TENSORS, rebuilt by hand so that tests can bend them."""
    header: dict[str, object] = {"__metadata__": {"fedcompute": json.dumps({"num_examples": 3})}}
    data, offset = b"", 0
    for name, dtype in (("b", "F32"), ("e", "F32"), ("n", "I64"), ("w", "F32")):
        chunk = TENSORS[name].numpy().tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(TENSORS[name].shape),
            "data_offsets": [offset, offset + len(chunk)],
        }
        data, offset = data + chunk, offset + len(chunk)
    return header, data


def _library(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, object]] | None:
    try:
        tensors = checkpoints.decode(payload)
        check_tensors(SCHEMA, tensors)
        return tensors, _plain_metadata(payload)
    except ValueError:
        return None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist()
    )


def _plain_metadata(payload: bytes) -> dict[str, object]:
    """Our metadata read with nothing but json (an oracle independent of the reader under test)."""
    header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    raw = header.get("__metadata__", {}).get("fedcompute")
    return {} if raw is None else dict(json.loads(raw))


def _accepted_only_if_the_library_agrees(payload: bytes) -> bool:
    try:
        views, meta = checkpoints.decode_views(payload, SCHEMA)
    except ValueError:
        return False
    library = _library(payload)
    assert library is not None, "decode_views accepted what safetensors refuses"
    assert set(views) == set(library[0])
    assert meta == library[1]
    for name, tensor in views.items():
        assert tensor.dtype == library[0][name].dtype
        assert _same_bits(tensor, library[0][name])  # a mutation may make a NaN: equal bits, not equal values
    return True


def test_what_the_encoder_writes_is_viewed_in_place_with_its_metadata() -> None:
    payload = checkpoints.encode(TENSORS, {"num_examples": 3, "metrics": {"loss": 0.5}})
    views, meta = checkpoints.decode_views(payload, SCHEMA)
    assert meta == {"num_examples": 3, "metrics": {"loss": 0.5}}
    assert _accepted_only_if_the_library_agrees(payload)
    for name in ("w", "b", "n"):
        assert torch.equal(views[name], TENSORS[name])
    # a view, not a copy: each tensor's memory lies inside the payload's own buffer
    whole = torch.frombuffer(payload, dtype=torch.uint8)
    assert all(whole.data_ptr() <= views[n].data_ptr() < whole.data_ptr() + len(payload) for n in ("w", "b", "n"))


def test_a_layout_rebuilt_by_hand_reads_the_same_and_key_order_and_padding_do_not_matter() -> None:
    header, data = _layout()
    assert _accepted_only_if_the_library_agrees(_payload(header, data))
    reordered = dict(reversed(list(header.items())))
    assert _accepted_only_if_the_library_agrees(_payload(reordered, data, pad=b"   "))
    entry = header["w"]
    assert isinstance(entry, dict)
    entry["note"] = "an entry's other keys are ignored, as the library ignores them"
    assert _accepted_only_if_the_library_agrees(_payload(header, data))


def test_a_header_that_leaves_the_data_misaligned_is_read_through_one_aligned_copy() -> None:
    header, data = _layout()
    pad = b" " * (1 + (len(json.dumps(header)) + 8) % 2)  # 8 + the header's length comes out odd
    payload = _payload(header, data, pad)
    assert (8 + len(json.dumps(header)) + len(pad)) % 2 == 1  # no tensor's data is aligned
    assert _accepted_only_if_the_library_agrees(payload)


def _bent(change: str) -> bytes:
    header, data = _layout()
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    w, b = entries["w"], entries["b"]
    assert isinstance(w, dict)
    assert isinstance(b, dict)
    if change == "overlap":
        b["data_offsets"] = [0, 16]
        w["data_offsets"] = [8, 56]
    elif change == "gap":
        w["data_offsets"] = [w["data_offsets"][0] + 4, w["data_offsets"][1] + 4]
        data += b"\x00" * 4
    elif change == "trailing bytes":
        data += b"\x00" * 4
    elif change == "short data":
        data = data[:-4]
    elif change == "wrong dtype":
        w["dtype"] = "F64"
    elif change == "unknown dtype":
        w["dtype"] = "F128"
    elif change == "wrong shape":
        w["shape"] = [4, 3]
    elif change == "negative shape":
        w["shape"] = [-3, -4]
    elif change == "boolean shape":
        b["shape"] = [True, 4]
    elif change == "offsets do not fit the shape":
        w["data_offsets"] = [w["data_offsets"][0], w["data_offsets"][1] - 4]
    elif change == "missing tensor":
        del header["n"]
    elif change == "extra tensor":
        header["x"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    elif change == "entry not an object":
        header["b"] = [1, 2]
    elif change == "metadata not strings":
        header["__metadata__"] = {"fedcompute": 3}
    elif change == "metadata not an object":
        header["__metadata__"] = {"fedcompute": "[1]"}
    return _payload(header, data)


@pytest.mark.parametrize(
    "change",
    [
        "overlap", "gap", "trailing bytes", "short data", "wrong dtype", "unknown dtype", "wrong shape",
        "negative shape", "boolean shape", "offsets do not fit the shape", "missing tensor", "extra tensor",
        "entry not an object", "metadata not strings", "metadata not an object",
    ],
)  # fmt: skip
def test_each_malformed_layout_is_refused(change: str) -> None:
    with pytest.raises(ValueError, match=REFUSAL):
        checkpoints.decode_views(_bent(change), SCHEMA)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00" * 7,
        struct.pack("<Q", 0),
        struct.pack("<Q", 1 << 40) + b"{}",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 3) + b" {}",  # the library wants the header to start with "{"
        struct.pack("<Q", 2) + b"\xff\xfe",
    ],
)
def test_headers_that_are_not_safetensors_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match=REFUSAL):
        checkpoints.decode_views(payload, SCHEMA)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8), st.booleans())
@example(316, b"\x00\x00\x81\x7f", False)  # a float turned NaN: found by hypothesis in a CI run
def test_mutated_payloads_are_accepted_only_when_the_library_agrees(at: int, noise: bytes, insert: bool) -> None:
    payload = checkpoints.encode(TENSORS, {"num_examples": 3})
    at = min(at, len(payload))
    bent = payload[:at] + noise + payload[at + (0 if insert else len(noise)) :]
    _accepted_only_if_the_library_agrees(bent)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 120), min_size=4, max_size=4),
    st.lists(st.sampled_from(["F32", "I64", "F64", "BF16"]), min_size=4, max_size=4),
    st.integers(0, 16),
)
def test_generated_offsets_and_dtypes_are_accepted_only_when_the_library_agrees(
    starts: list[int], dtypes: list[str], extra: int
) -> None:
    header, data = _layout()
    for (_, entry), start, dtype in zip(
        [(k, v) for k, v in header.items() if k != "__metadata__"], starts, dtypes, strict=True
    ):
        assert isinstance(entry, dict)
        length = entry["data_offsets"][1] - entry["data_offsets"][0]
        entry["data_offsets"] = [start, start + length]
        entry["dtype"] = dtype
    _accepted_only_if_the_library_agrees(_payload(header, data + b"\x01" * extra))
