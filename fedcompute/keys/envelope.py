"""The EncryptedContribution envelope: sealing (devices) and well-formedness and binding checks (servers)."""

from __future__ import annotations

from typing import BinaryIO

from google.protobuf.message import DecodeError

from fedcompute.core.context import ContributionContext
from fedcompute.core.errors import InvalidArgument
from fedcompute.keys import hpke
from fedcompute.rpc import wire
from fedcompute.v1 import upload_pb2

FIELD = "upload"
ENVELOPE_VERSION = 1
NOT_AN_ENVELOPE = "is not an EncryptedContribution envelope; encrypt the update first"
CIPHERTEXT_FIELD = upload_pb2.EncryptedContribution.DESCRIPTOR.fields_by_name["ciphertext"].number


def parse_envelope(data: bytes) -> upload_pb2.EncryptedContribution:
    envelope = upload_pb2.EncryptedContribution()
    try:
        envelope.ParseFromString(data)
    except DecodeError:
        raise InvalidArgument(FIELD, NOT_AN_ENVELOPE) from None
    _check_header(envelope, len(envelope.ciphertext))
    return envelope


def read_envelope_header(handle: BinaryIO, size: int) -> upload_pb2.EncryptedContribution:
    """The envelope in a file, every field but the ciphertext, which is stepped over (its length checked): the
    server checks an upload's envelope without reading its payload. Reads the wire format as protobuf does (the
    last occurrence of a field wins; a field of an unexpected wire type, an unknown field, or a group, is skipped;
    a truncated or malformed stream is refused). An envelope of more than ``wire.MAX_FIELDS`` fields (a device sends
    seven) is read whole by protobuf's parser: a Python step per field let one device hold the server's GIL for
    over a minute with a 64 MiB upload of 2-byte fields (0.51 s per 400 KB here)."""
    try:
        return _scan(handle, size)
    except wire.TooManyFields:
        handle.seek(0)
        envelope = parse_envelope(_read_exactly(handle, size))
        envelope.ClearField("ciphertext")
        return envelope


def envelope_view(data: bytes | memoryview) -> tuple[upload_pb2.EncryptedContribution, memoryview]:
    """``parse_envelope`` without copying the ciphertext: the envelope's other fields, and its ciphertext as a view
    of ``data`` (the aggregator opens it in place). The ciphertext is cut out by ``wire.split_off`` (the last one
    wins, as protobuf has it) and protobuf parses the rest; past ``wire.MAX_FIELDS`` fields, as in
    ``read_envelope_header``, protobuf reads it whole (its ciphertext then a copy)."""
    try:
        rest, ciphertext = wire.split_off(data, CIPHERTEXT_FIELD)
        envelope = upload_pb2.EncryptedContribution.FromString(rest)
    except wire.TooManyFields:
        envelope = parse_envelope(bytes(data))
        whole = envelope.ciphertext
        envelope.ClearField("ciphertext")
        return envelope, memoryview(whole)
    except (ValueError, DecodeError):
        raise InvalidArgument(FIELD, NOT_AN_ENVELOPE) from None
    ciphertext = memoryview(b"") if ciphertext is None else ciphertext
    _check_header(envelope, len(ciphertext))
    return envelope, ciphertext


def _scan(handle: BinaryIO, size: int) -> upload_pb2.EncryptedContribution:
    """The envelope in a file, its fields but the ciphertext, which is stepped over (the last one's length checked);
    what ``read_envelope_header`` returns."""
    header = bytearray()
    ciphertext_length = 0
    end = size
    handle.seek(0)
    position = fields = 0
    groups: list[int] = []  # groups open here (``wire._fields``): stepped over, as protobuf steps over them
    while position < end:
        fields += 1
        if fields > wire.MAX_FIELDS:
            raise wire.TooManyFields(f"more than {wire.MAX_FIELDS} fields")
        key, position = _varint(handle, position, end, wire.KEY_BYTES)
        try:
            field, wire_type = wire.check_key(key, inside_group=bool(groups))
        except ValueError:
            raise InvalidArgument(FIELD, NOT_AN_ENVELOPE) from None
        if wire_type == 0:
            value, after = _varint(handle, position, end)
            if not groups:
                header += wire.varint(key) + wire.varint(value)
        elif wire_type == 2:
            length, start = _varint(handle, position, end, wire.SIZE_BYTES)
            after = start + length
            if after > end:
                raise InvalidArgument(FIELD, NOT_AN_ENVELOPE)
            if groups:  # a group's field is the group's, never the ciphertext
                handle.seek(after)
            elif field == CIPHERTEXT_FIELD:
                ciphertext_length = length
                handle.seek(after)
            else:
                header += wire.varint(key) + wire.varint(length) + _read_exactly(handle, length)
        elif wire_type in (1, 5):
            after = position + (8 if wire_type == 1 else 4)
            if after > end:
                raise InvalidArgument(FIELD, NOT_AN_ENVELOPE)
            value_bytes = _read_exactly(handle, after - position)
            if not groups:
                header += wire.varint(key) + value_bytes
        elif wire_type == 3:
            after = position
            groups.append(field)
            if len(groups) > wire.MAX_GROUP_DEPTH:
                raise InvalidArgument(FIELD, NOT_AN_ENVELOPE)
        elif wire_type == 4:
            after = position
            if not groups or groups.pop() != field:
                raise InvalidArgument(FIELD, NOT_AN_ENVELOPE)
        else:  # the undefined wire types: protobuf refuses them too
            raise InvalidArgument(FIELD, NOT_AN_ENVELOPE)
        position = after
    if groups:
        raise InvalidArgument(FIELD, NOT_AN_ENVELOPE)
    envelope = upload_pb2.EncryptedContribution()
    try:
        envelope.ParseFromString(bytes(header))  # the small fields, with protobuf's own decoding and checks
    except DecodeError:
        raise InvalidArgument(FIELD, NOT_AN_ENVELOPE) from None
    _check_header(envelope, ciphertext_length)
    return envelope


def _check_header(envelope: upload_pb2.EncryptedContribution, ciphertext_length: int) -> None:
    if envelope.version != ENVELOPE_VERSION:
        raise InvalidArgument(
            FIELD, f"envelope version {envelope.version} is not supported (expected {ENVELOPE_VERSION})"
        )
    if (envelope.kem_id, envelope.kdf_id, envelope.aead_id) != (hpke.KEM_ID, hpke.KDF_ID, hpke.AEAD_ID):
        raise InvalidArgument(FIELD, "envelope must use HPKE X25519 / HKDF-SHA256 / ChaCha20-Poly1305")
    if not envelope.key_id:
        raise InvalidArgument(FIELD, "envelope names no key_id")
    if ciphertext_length < hpke.ENC_BYTES + hpke.TAG_BYTES:
        raise InvalidArgument(FIELD, "envelope ciphertext is too short to be HPKE output")


def _read_exactly(handle: BinaryIO, n: int) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise InvalidArgument(FIELD, NOT_AN_ENVELOPE)
    return data


def _varint(handle: BinaryIO, position: int, end: int, most: int = 10) -> tuple[int, int]:
    """A base-128 varint at ``position`` (at most ``most`` bytes, within ``end``): its value and the next
    position."""
    value = shift = 0
    while True:
        if position >= end or shift >= 7 * most:
            raise InvalidArgument(FIELD, NOT_AN_ENVELOPE)
        byte = _read_exactly(handle, 1)[0]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, position
        shift += 7


def check_envelope(data: bytes | upload_pb2.EncryptedContribution, expected: ContributionContext) -> None:
    """Raise ``InvalidArgument`` unless ``data`` (an envelope's bytes, or its header from
    ``read_envelope_header``) is an envelope whose context is exactly ``expected``."""
    envelope = parse_envelope(data) if isinstance(data, bytes) else data
    try:
        context = ContributionContext.decode(envelope.context)
    except ValueError as exc:
        raise InvalidArgument(FIELD, f"envelope context is malformed: {exc}") from None
    if context.key_id != envelope.key_id:
        raise InvalidArgument(FIELD, "envelope key_id differs from the key in its context")
    mine = ContributionContext(
        expected.population_name,
        expected.task_id,
        expected.round,
        expected.aggregation_id,
        expected.assignment_id,
        context.key_id,
        expected.model_version,
        expected.plan_sha256_hex,
        expected.policy_sha256_hex,
    )
    if context != mine:
        raise InvalidArgument(FIELD, "envelope context is bound to another task, round or assignment")


def seal_contribution(
    plaintext: bytes, context: ContributionContext, public_key: bytes
) -> upload_pb2.EncryptedContribution:
    """Device side: HPKE-seal an update to the population key, bound to its context."""
    return upload_pb2.EncryptedContribution.FromString(sealed_envelope(plaintext, context, public_key))


def sealed_envelope(plaintext: bytes, context: ContributionContext, public_key: bytes) -> bytes:
    """``seal_contribution``, encoded (``rpc.wire``): the bytes a device uploads, byte for byte what
    ``SerializeToString`` gives (tests). The ciphertext is copied once, into the envelope; building the message
    copied it and serializing copied it again (0.5 + 0.75 ms of memory traffic per 4.5 MB update here, 2-4 times
    that while the devices of a benchmark round shared the machine with the servers)."""
    info = context.encode()
    ciphertext = hpke.seal(plaintext, hpke.load_public(public_key), info)
    return wire.message(
        (1, ENVELOPE_VERSION), (2, context.key_id), (3, hpke.KEM_ID), (4, hpke.KDF_ID), (5, hpke.AEAD_ID),
        (6, info), (7, ciphertext),
    )  # fmt: skip
