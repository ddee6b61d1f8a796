"""The EncryptedContribution envelope: sealing (devices) and well-formedness and binding checks (servers)."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from fedcompute.core.context import ContributionContext
from fedcompute.core.errors import InvalidArgument
from fedcompute.keys import hpke
from fedcompute.v1 import upload_pb2

FIELD = "upload"


def parse_envelope(data: bytes) -> upload_pb2.EncryptedContribution:
    envelope = upload_pb2.EncryptedContribution()
    try:
        envelope.ParseFromString(data)
    except DecodeError:
        raise InvalidArgument(FIELD, "is not an EncryptedContribution envelope; encrypt the update first") from None
    if envelope.version != 1:
        raise InvalidArgument(FIELD, f"envelope version {envelope.version} is not supported (expected 1)")
    if (envelope.kem_id, envelope.kdf_id, envelope.aead_id) != (hpke.KEM_ID, hpke.KDF_ID, hpke.AEAD_ID):
        raise InvalidArgument(FIELD, "envelope must use HPKE X25519 / HKDF-SHA256 / ChaCha20-Poly1305")
    if not envelope.key_id:
        raise InvalidArgument(FIELD, "envelope names no key_id")
    if len(envelope.ciphertext) < hpke.ENC_BYTES + hpke.TAG_BYTES:
        raise InvalidArgument(FIELD, "envelope ciphertext is too short to be HPKE output")
    return envelope


def check_envelope(data: bytes, expected: ContributionContext) -> None:
    """Raise ``InvalidArgument`` unless ``data`` is an envelope whose context is exactly ``expected``."""
    envelope = parse_envelope(data)
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
    info = context.encode()
    return upload_pb2.EncryptedContribution(
        version=1,
        key_id=context.key_id,
        kem_id=hpke.KEM_ID,
        kdf_id=hpke.KDF_ID,
        aead_id=hpke.AEAD_ID,
        context=info,
        ciphertext=hpke.seal(plaintext, hpke.load_public(public_key), info),
    )
