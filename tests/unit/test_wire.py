"""Responses the servers encode by hand (rpc/wire.py): byte for byte protobuf's own encoding, and parsed back; and
the upload's WriteRequest, read by hand: as protobuf's parser reads it."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcompute.clients.typed import encode_write, streamed_contribution
from fedcompute.core.errors import InvalidArgument
from fedcompute.rpc import wire
from fedcompute.server.api_devices import encode_read, write_chunk
from fedcompute.v1 import resource_pb2, upload_pb2
from tests.mutations import maybe_damaged

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


def _key(number: int, wire_type: int) -> bytes:
    return wire.varint(number << 3 | wire_type)


def _padded(n: int, extra: int) -> bytes:
    """``n`` as a varint ``extra`` bytes longer than it needs (continuation bits and zero groups)."""
    encoded = bytearray(wire.varint(n))
    for _ in range(extra):
        encoded[-1] |= 0x80
        encoded.append(0)
    return bytes(encoded)


_ZERO_FIELD_VALUE = {0: b"\x01", 1: bytes(8), 2: b"\x01x", 3: _key(0, 4), 5: bytes(4)}
_metadata = st.builds(
    lambda size, sha: upload_pb2.UploadMetadata(total_size_bytes=size, sha256_hex=sha).SerializeToString(),
    st.integers(-(2**63), 2**63 - 1), st.text(max_size=70),
)  # fmt: skip
_write_field = st.one_of(
    st.builds(lambda t: wire.message((1, t)), st.text(max_size=40)),  # resource_name
    st.builds(lambda n: _key(2, 0) + wire.varint(n), st.integers(0, 2**64 - 1)),  # write_offset (negative too)
    st.builds(lambda n: _key(3, 0) + wire.varint(n), st.integers(0, 3)),  # finish_write
    st.builds(lambda b: _key(4, 2) + wire.varint(len(b)) + b, st.binary(max_size=300)),  # data, empty too
    st.builds(lambda n: _key(4, 0) + wire.varint(n), st.integers(0, 300)),  # data with the wrong wire type
    st.builds(lambda t: wire.message((5, t)), st.text(max_size=70)),  # upload_token
    st.builds(lambda m: _key(6, 2) + wire.varint(len(m)) + m, _metadata),  # metadata: repeats merge
    st.builds(lambda n, b: _key(n, 2) + wire.varint(len(b)) + b, st.integers(7, 2**29 - 1), st.binary(max_size=40)),
    st.builds(lambda n, v: _key(n, 0) + wire.varint(v), st.integers(7, 2**29 - 1), st.integers(0, 2**64 - 1)),
    st.builds(lambda n, b: _key(n, 1) + b, st.integers(7, 2**29 - 1), st.binary(min_size=8, max_size=8)),
    st.builds(lambda n, b: _key(n, 5) + b, st.integers(7, 2**29 - 1), st.binary(min_size=4, max_size=4)),
    # a group (proto2's wire types 3 and 4), of any number, a known one's too: protobuf steps over it, data inside
    # it included (the group's field 4, not the message's); nested; or started or ended alone (refused)
    st.builds(
        lambda n, b: _key(n, 3) + _key(4, 2) + wire.varint(len(b)) + b + _key(n, 4),
        st.integers(1, 2**29 - 1),
        st.binary(max_size=40),
    ),
    st.builds(
        lambda n, m: _key(n, 3) + _key(m, 3) + _key(2, 0) + b"\x01" + _key(m, 4) + _key(n, 4),
        st.integers(1, 40),
        st.integers(1, 40),
    ),
    st.builds(lambda n, t: _key(n, t), st.integers(1, 40), st.sampled_from([3, 4])),
    # field number 0: refused, but inside a group, where protobuf skips it without that check (of every wire type,
    # a group 0 too)
    st.builds(lambda t: _key(9, 3) + _key(0, t) + _ZERO_FIELD_VALUE[t] + _key(9, 4), st.sampled_from([0, 1, 2, 3, 5])),
    st.builds(lambda t: _key(0, t) + _ZERO_FIELD_VALUE[t], st.sampled_from([0, 1, 2, 3, 5])),
    # keys and lengths encoded longer than they need: protobuf reads up to 5 bytes of either, a key up to 32 bits
    st.builds(lambda n, extra: _padded(n << 3, extra) + b"\x01", st.integers(1, 40), st.integers(0, 5)),
    st.builds(lambda extra, b: _key(4, 2) + _padded(len(b), extra) + b, st.integers(0, 5), st.binary(max_size=10)),
    st.builds(lambda top: b"\xc8\x80\x80\x80" + bytes([top]) + b"\x01", st.integers(0, 0x7F)),
    st.builds(lambda extra: _key(9, 3) + _padded(9 << 3 | 4, extra), st.integers(0, 5)),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(_write_field, max_size=10), st.lists(_write_field, min_size=60, max_size=70)), st.data())
def test_the_server_reads_a_write_request_as_protobuf_does(fields: list[bytes], data: st.DataObject) -> None:
    """``write_chunk`` (the data a view of the message, the rest through protobuf's parser) against protobuf's
    parser alone, over every field, repeats (the last data wins, metadata merges), data with the wrong wire type,
    unknown fields of every wire type, groups (data inside one is the group's), and messages cut or with a byte
    altered: the same fields, or both refuse (INVALID_ARGUMENT here); on both sides of ``wire.MAX_FIELDS`` (past it
    protobuf reads the whole message)."""
    raw = maybe_damaged(b"".join(fields), data)
    try:
        r = upload_pb2.WriteRequest.FromString(raw)
    except DecodeError:
        with pytest.raises(InvalidArgument, match="not a valid protobuf message"):
            write_chunk(raw)
        return
    got = write_chunk(raw)
    expected = (r.resource_name, r.write_offset, r.finish_write, r.data, r.upload_token,
                r.metadata.total_size_bytes, r.metadata.sha256_hex)  # fmt: skip
    assert (got.resource_name, got.write_offset, got.finish_write, bytes(got.data), got.upload_token,
            got.total_size, got.sha256_hex) == expected  # fmt: skip


def test_a_write_requests_data_is_a_view_of_the_message_not_a_copy() -> None:
    chunk = bytes(range(256)) * 4096
    raw = upload_pb2.WriteRequest(resource_name="uploads/asg_x", write_offset=7, data=chunk).SerializeToString()
    got = write_chunk(raw)
    assert (got.resource_name, got.write_offset, got.data) == ("uploads/asg_x", 7, chunk)
    assert isinstance(got.data, memoryview)
    assert got.data.obj is raw
    assert wire.split_off(b"\x0a\x01x", 4) == (b"\x0a\x01x", None)  # no data field: the message as it is


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_384, 1024 * 1024])
@pytest.mark.parametrize("offset", [0, 1, 2**20, 2**40])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("finish", [True, False])
def test_a_write_request_encoded_by_a_device_is_the_protobuf_encoding(
    size: int, offset: int, first: bool, finish: bool
) -> None:
    """What ``clients.device.upload`` sends (``encode_write``, the chunk a view of the envelope): byte for byte
    ``SerializeToString``, the first message naming and declaring the upload, the others carrying bytes only."""
    chunk = _data(size)
    metadata = upload_pb2.UploadMetadata(total_size_bytes=offset + size + 1, sha256_hex="ab" * 32)
    named = ("uploads/asg_x", "t" * 64, metadata) if first else ("", "", None)
    encoded = encode_write(offset, memoryview(chunk), finish, *named)
    expected = upload_pb2.WriteRequest(write_offset=offset, data=chunk, finish_write=finish)
    if first:
        expected.resource_name, expected.upload_token = "uploads/asg_x", "t" * 64
        expected.metadata.CopyFrom(metadata)
    assert encoded == expected.SerializeToString()


def test_a_message_of_many_tiny_fields_is_read_by_protobuf_not_scanned_by_hand() -> None:
    """A 2 MiB WriteRequest of a million 2-byte fields (data repeated, the last one wins): scanning it by hand
    would take a Python step per field, GIL held, before the caller is even authorized. The scan stops past
    ``MAX_FIELDS`` and protobuf reads it: the same fields as protobuf alone. The worker's reader does the same."""
    raw = b"\x22\x00" * 1_000_000 + wire.message((1, "uploads/asg_x"), (4, b"last"))
    with pytest.raises(wire.TooManyFields):
        wire.split_off(raw, 4)
    got = write_chunk(raw)
    assert (got.resource_name, bytes(got.data)) == ("uploads/asg_x", b"last")
    with pytest.raises(InvalidArgument, match="not a valid protobuf message"):
        write_chunk(raw + b"\x22\x05ab")  # cut short after the many fields: protobuf refuses it too
    streamed = b"\x12\x00" * 1_000_000 + wire.message((1, "asg_y"), (2, b"envelope"))
    with pytest.raises(wire.TooManyFields):
        wire.length_delimited(streamed, frozenset({1, 2}))
    contribution = streamed_contribution(streamed)
    assert (contribution.assignment_id, bytes(contribution.envelope)) == ("asg_y", b"envelope")
    with pytest.raises(ValueError, match="Error parsing message"):
        streamed_contribution(streamed + b"\x12\x05ab")
