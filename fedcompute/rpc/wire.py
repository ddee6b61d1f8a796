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
# what upb accepts of a field's key and of a length: a varint of at most 5 bytes, a key of at most 32 bits (a value
# may take 10 bytes); a longer encoding, or a larger key, it refuses, and so do the readers here
KEY_BYTES = SIZE_BYTES = 5
MAX_KEY = 0xFFFFFFFF


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
    message, at most ``MAX_GROUP_DEPTH`` deep; inside one, field number 0 is accepted, as protobuf accepts it
    there. Keys and lengths as upb reads them (``KEY_BYTES``, ``MAX_KEY``)."""
    position, end, count = 0, len(view), 0
    groups: list[int] = []  # the numbers of the groups open here, innermost last
    while position < end:
        count += 1
        if count > MAX_FIELDS:
            raise TooManyFields(f"more than {MAX_FIELDS} fields")
        key_at = position
        key, position = _read_varint(view, position, KEY_BYTES)
        number, wire_type = check_key(key, inside_group=bool(groups))
        if wire_type == 0:
            _, position = _read_varint(view, position)
        elif wire_type == 2:
            length, start = _read_varint(view, position, SIZE_BYTES)
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


def check_key(key: int, inside_group: bool) -> tuple[int, int]:
    """A field's key as (number, wire type); ``ValueError`` where upb refuses it: past 32 bits, or field number 0
    outside a group (an unknown group's fields upb skips without that check)."""
    if key > MAX_KEY:
        raise ValueError("a field key past 32 bits")
    if key >> 3 == 0 and not inside_group:
        raise ValueError("field number 0")
    return key >> 3, key & 7


def _read_varint(view: memoryview, position: int, most: int = 10) -> tuple[int, int]:
    """The varint at ``position`` of at most ``most`` bytes: its value (a 10-byte one cut to 64 bits, as protobuf
    cuts it) and the next position."""
    value = shift = 0
    while True:
        if position >= len(view) or shift >= 7 * most:
            raise ValueError(f"a varint runs past the message or past {most} bytes")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, position
        shift += 7
