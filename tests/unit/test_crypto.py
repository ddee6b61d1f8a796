"""HPKE sealing of contributions and key releases; envelope checks on the server side."""

from __future__ import annotations

import pytest

from fedcompute.core.context import ContributionContext
from fedcompute.core.errors import InvalidArgument
from fedcompute.keys import hpke
from fedcompute.keys.envelope import check_envelope, seal_contribution
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
