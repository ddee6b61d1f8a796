"""Responses the servers encode by hand (rpc/wire.py): byte for byte protobuf's own encoding, and parsed back."""

from __future__ import annotations

import pytest

from fedcompute.rpc import wire
from fedcompute.server.api_devices import encode_read
from fedcompute.v1 import resource_pb2

SIZES = [0, 1, 127, 128, 16_383, 16_384, 1024 * 1024, 2_097_152 + 3]


def _data(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("total", [0, 1, 127, 128, 300, 2**31, 2**62])
@pytest.mark.parametrize("sha256_hex", ["", "ab" * 32])
def test_a_read_response_encoded_by_the_server_is_the_protobuf_encoding(size: int, total: int, sha256_hex: str) -> None:
    data = _data(size)
    encoded = encode_read(data, total, sha256_hex)
    expected = resource_pb2.ReadResponse(data=data, total_size_bytes=total, sha256_hex=sha256_hex)
    assert encoded == expected.SerializeToString()
    parsed = resource_pb2.ReadResponse.FromString(encoded)
    assert (parsed.data, parsed.total_size_bytes, parsed.sha256_hex) == (data, total, sha256_hex)


def test_varints_and_what_is_refused() -> None:
    assert [wire.varint(n) for n in (0, 1, 127, 128, 300, 16_384)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x01",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="non-negative"):
        wire.varint(-1)
    assert wire.message((1, ""), (2, 0), (3, b"")) == b""  # proto3: defaults are not on the wire
