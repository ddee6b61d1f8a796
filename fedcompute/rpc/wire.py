"""Protobuf's wire format by hand: messages that carry megabytes, and the varints the envelope header re-encodes.

The protobuf runtime (upb) serializes a message holding a large bytes field slowly: 6 ms for a 4 MiB
StreamContributionsResponse and 1.3 ms for a 1 MiB ReadResponse here, against 0.3 and 0.04 ms to join the same
bytes, all of it while the server holds the GIL. The servicers of those methods yield bytes built with these
helpers instead, registered with ``rpc.serving.add_service(..., encoded=...)``; the output is byte for byte what
``SerializeToString`` gives (fields in number order, proto3 defaults left out), which the tests check. The
worker reads each StreamContributionsResponse with :func:`length_delimited` instead of the runtime's parser, whose
parse and bytes-field read copy the envelope twice (0.67 ms per 4.5 MB here): its fields are views of the message
received. The server reads each upload's WriteRequest the same way (:func:`split_off`): its chunk of data a view
of the message, the rest left to the runtime's parser.
"""

from __future__ import annotations

from collections.abc import Iterator


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


def message(*fields: tuple[int, bytes | memoryview | str | int]) -> bytes:
    """A message of the given (field number, value) pairs, in the order given (give them in number order):
    bytes (or a view of them) and str as length-delimited fields (wire type 2), int as a varint (wire type 0,
    non-negative int64); an empty or zero value is left out, as proto3 does."""
    parts: list[bytes | memoryview] = []
    for number, value in fields:
        if isinstance(value, int):
            if value:
                parts += (varint(number << 3), varint(value))
            continue
        data = value.encode() if isinstance(value, str) else value
        if data:
            parts += (varint(number << 3 | 2), varint(len(data)), data)
    return b"".join(parts)


MAX_FIELDS = 64  # fields read by hand in one message; the messages read here have a handful
# groups nested in one another that protobuf's parser (upb, from Python) accepts: 100 deep parse, 101 fail
MAX_GROUP_DEPTH = 100


class TooManyFields(Exception):
    """A message with more than ``MAX_FIELDS`` fields: read it with protobuf's parser instead (its C loop). Scanning
    such a message here would cost a Python step per field: a 4 MiB message of 2-byte fields, a million steps with
    the GIL held, from a caller who needs no credentials to send it."""


def length_delimited(data: bytes, numbers: frozenset[int]) -> dict[int, memoryview]:
    """The length-delimited fields (wire type 2) numbered in ``numbers`` of the message ``data``, each as a view
    of ``data`` (no copy); the last one wins when a field repeats, as protobuf's parser has it; other fields, and
    groups, are stepped over. ``ValueError`` where protobuf's parser fails too: a truncated field or varint, field
    number 0, a group that does not end (or ends unopened, or nests too deep) and the undefined wire types;
    ``TooManyFields`` past ``MAX_FIELDS``."""
    view = memoryview(data)
    return {number: view[start:end] for number, _, start, end in _fields(view) if number in numbers}


def split_off(data: bytes | memoryview, number: int) -> tuple[bytes, memoryview | None]:
    """The message ``data`` without its length-delimited field ``number``, and that field's value as a view of
    ``data`` (the last one when it repeats, as protobuf's parser has it; None when absent). What is left is a
    message for protobuf's parser, which then reads every other field by its own rules (occurrences of the field
    with another wire type stay in it: protobuf keeps them as unknown fields). ``ValueError`` and
    ``TooManyFields`` as :func:`length_delimited`."""
    view = memoryview(data)
    kept: list[memoryview] = []
    value, resume = None, 0
    for _, key_at, start, end in _fields(view, number):
        kept.append(view[resume:key_at])
        value, resume = view[start:end], end
    if value is None:
        return data if isinstance(data, bytes) else bytes(data), None
    kept.append(view[resume:])
    return b"".join(kept), value


def _fields(view: memoryview, only: int = 0) -> Iterator[tuple[int, int, int, int]]:
    """The length-delimited fields of a message (only those numbered ``only``, when given): (number, where the
    field's key starts, where its value starts, where it ends); every field is checked on the way. A group (wire
    types 3 and 4, proto2's) is stepped over as protobuf's parser steps over one it does not know: its fields are
    checked, never yielded (they are the group's, not the message's); it must end with its own number, within the
    message, at most ``MAX_GROUP_DEPTH`` deep."""
    position, end, count = 0, len(view), 0
    groups: list[int] = []  # the numbers of the groups open here, innermost last
    while position < end:
        count += 1
        if count > MAX_FIELDS:
            raise TooManyFields(f"more than {MAX_FIELDS} fields")
        key_at = position
        key, position = _read_varint(view, position)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == 0:
            _, position = _read_varint(view, position)
        elif wire_type == 2:
            length, start = _read_varint(view, position)
            position = start + length
            if position > end:
                raise ValueError("a length-delimited field runs past the message")
            if not groups and (not only or number == only):
                yield number, key_at, start, position
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
            if position > end:
                raise ValueError("a fixed-size field runs past the message")
        elif wire_type == 3:
            groups.append(number)
            if len(groups) > MAX_GROUP_DEPTH:
                raise ValueError(f"groups nested more than {MAX_GROUP_DEPTH} deep")
        elif wire_type == 4:
            if not groups or groups.pop() != number:
                raise ValueError("a group ends that did not start")
        else:
            raise ValueError(f"wire type {wire_type} is not accepted")
    if groups:
        raise ValueError("a group runs past the message")


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(view) or shift >= 70:
            raise ValueError("a varint runs past the message or past 10 bytes")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, position
        shift += 7
