"""Protobuf's wire format by hand: responses that carry megabytes, and the varints the envelope header re-encodes.

The protobuf runtime (upb) serializes a message holding a large bytes field slowly: 6 ms for a 4 MiB
StreamContributionsResponse and 1.3 ms for a 1 MiB ReadResponse here, against 0.3 and 0.04 ms to join the same
bytes, all of it while the server holds the GIL. The servicers of those methods yield bytes built with these
helpers instead, registered with ``rpc.serving.add_service(..., encoded=...)``; the output is byte for byte what
``SerializeToString`` gives (fields in number order, proto3 defaults left out), which the tests check.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint."""
    if n < 0:
        raise ValueError("only non-negative integers are encoded here")
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def message(*fields: tuple[int, bytes | str | int]) -> bytes:
    """A message of the given (field number, value) pairs, in the order given (give them in number order):
    bytes and str as length-delimited fields (wire type 2), int as a varint (wire type 0, non-negative int64);
    an empty or zero value is left out, as proto3 does."""
    parts: list[bytes] = []
    for number, value in fields:
        if isinstance(value, int):
            if value:
                parts += (varint(number << 3), varint(value))
            continue
        data = value.encode() if isinstance(value, str) else value
        if data:
            parts += (varint(number << 3 | 2), varint(len(data)), data)
    return b"".join(parts)
