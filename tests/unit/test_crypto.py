"""HPKE sealing of contributions and key releases; envelope checks on the server side."""

from __future__ import annotations

import pytest

from fedcompute.core.context import ContributionContext
from fedcompute.core.errors import InvalidArgument
from fedcompute.keys import hpke
from fedcompute.keys.envelope import check_envelope, parse_envelope, seal_contribution, sealed_envelope
from fedcompute.v1 import upload_pb2

CTX = ContributionContext("pop", "task_1", 3, "agg_1", "asg_1", "k_1", 3, "ab" * 32, "cd" * 32)


def test_seal_open_bound_to_context() -> None:
    key = hpke.generate_private_key()
    sealed = hpke.seal(b"update", key.public_key(), CTX.encode())
    assert hpke.open_sealed(sealed, key, CTX.encode()) == b"update"
    other = ContributionContext("pop", "task_1", 4, "agg_1", "asg_1", "k_1", 3, "ab" * 32, "cd" * 32)
    with pytest.raises(hpke.DecryptionError):
        hpke.open_sealed(sealed, key, other.encode())
    with pytest.raises(hpke.DecryptionError):
        hpke.open_sealed(sealed, hpke.generate_private_key(), CTX.encode())


def test_key_id_is_self_certifying() -> None:
    key = hpke.generate_private_key()
    pub = hpke.public_bytes(key.public_key())
    assert hpke.key_id_for(pub) == hpke.key_id_for(pub)
    assert hpke.key_id_for(pub) != hpke.key_id_for(hpke.public_bytes(hpke.generate_private_key().public_key()))


def test_envelope_accepted_only_when_bound_to_the_assignment() -> None:
    key = hpke.generate_private_key()
    envelope = seal_contribution(b"payload", CTX, hpke.public_bytes(key.public_key())).SerializeToString()
    check_envelope(envelope, CTX)
    elsewhere = ContributionContext("pop", "task_2", 3, "agg_1", "asg_1", "", 3, "ab" * 32, "cd" * 32)
    with pytest.raises(InvalidArgument, match="another task"):
        check_envelope(envelope, elsewhere)


@pytest.mark.parametrize("size", [0, 1, 100, 70_000, 4_500_000])
def test_the_encoded_envelope_is_what_protobuf_serializes(size: int) -> None:
    """A device uploads ``sealed_envelope``'s bytes, encoded by hand: they must be exactly the serialization of the
    message they hold (the hash the device declares, and the server's and the aggregator's checks, read them)."""
    key = hpke.generate_private_key()
    plaintext = bytes(range(256)) * (size // 256) + bytes(size % 256)
    encoded = sealed_envelope(plaintext, CTX, hpke.public_bytes(key.public_key()))
    envelope = parse_envelope(encoded)
    assert envelope.SerializeToString() == encoded
    expected = upload_pb2.EncryptedContribution(
        version=1, key_id=CTX.key_id, kem_id=hpke.KEM_ID, kdf_id=hpke.KDF_ID, aead_id=hpke.AEAD_ID,
        context=CTX.encode(), ciphertext=envelope.ciphertext,
    )  # fmt: skip
    assert expected.SerializeToString() == encoded
    assert hpke.open_sealed(envelope.ciphertext, key, CTX.encode()) == plaintext
    check_envelope(encoded, CTX)


@pytest.mark.parametrize(
    "data",
    [
        b"plaintext model update",
        upload_pb2.EncryptedContribution(version=2).SerializeToString(),
        upload_pb2.EncryptedContribution(version=1, key_id="k", kem_id=1, kdf_id=1, aead_id=3).SerializeToString(),
        upload_pb2.EncryptedContribution(
            version=1, key_id="k_1", kem_id=0x20, kdf_id=1, aead_id=3, context=b"x", ciphertext=b"y" * 60
        ).SerializeToString(),
    ],
    ids=["plaintext", "version", "suite", "context"],
)
def test_malformed_envelopes_are_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        check_envelope(data, CTX)
