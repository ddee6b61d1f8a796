"""Shamir sharing of a key, the signed key statement devices check, and the code measurement."""

from __future__ import annotations

import shutil
from itertools import combinations
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcompute.attestation.measure import manifest, measure, package_root
from fedcompute.keys import hpke, statement
from fedcompute.keys.shamir import combine_key, split_key
from fedcompute.v1 import common_pb2


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(2, 5), st.integers(0, 3))
def test_any_t_shares_rebuild_the_key(secret: bytes, threshold: int, extra: int) -> None:
    shares = split_key(secret, threshold, threshold + extra)
    assert len({i for i, _ in shares}) == threshold + extra
    for subset in combinations(shares, threshold):
        assert combine_key(list(subset), threshold) == secret


def test_fewer_or_wrong_shares_do_not_rebuild() -> None:
    secret = hpke.private_bytes(hpke.generate_private_key())
    shares = split_key(secret, 2, 3)
    with pytest.raises(ValueError, match="exactly 2"):
        combine_key(shares[:1], 2)
    index, share = shares[0]
    wrong = (index, bytes([share[0] ^ 1]) + share[1:])
    assert combine_key([wrong, shares[1]], 2) != secret
    assert split_key(secret, 1, 3)[2] == (3, secret)


def _key(providers: list[str], threshold: int) -> common_pb2.PublicKey:
    public = hpke.public_bytes(hpke.generate_private_key().public_key())
    return common_pb2.PublicKey(
        key_id=hpke.key_id_for(public),
        public_key=public,
        kem_id=hpke.KEM_ID,
        kdf_id=hpke.KDF_ID,
        aead_id=hpke.AEAD_ID,
        activation_time_unix=1,
        expiration_time_unix=2,
        destruction_time_unix=3,
        population_name="pop",
        threshold=threshold,
        provider_ids=providers,
    )


def test_devices_need_t_valid_signatures_from_trusted_providers() -> None:
    signers = {p: ec.generate_private_key(ec.SECP256R1()) for p in ("kp-0", "kp-1", "kp-2")}
    trusted = {p: k.public_key() for p, k in signers.items()}
    key = _key(list(signers), 2)
    one = common_pb2.KeySignature(provider_id="kp-0", signature=statement.sign(key, signers["kp-0"]))
    key.signatures.append(one)
    with pytest.raises(statement.UntrustedKey, match="1 valid signature"):
        statement.check_trusted(key, trusted, 2)
    key.signatures.append(one)  # the same provider twice counts once
    with pytest.raises(statement.UntrustedKey):
        statement.check_trusted(key, trusted, 2)
    stranger = ec.generate_private_key(ec.SECP256R1())
    key.signatures.append(common_pb2.KeySignature(provider_id="kp-evil", signature=statement.sign(key, stranger)))
    with pytest.raises(statement.UntrustedKey, match="unknown providers"):
        statement.check_trusted(key, trusted, 2)
    key.signatures.append(common_pb2.KeySignature(provider_id="kp-1", signature=statement.sign(key, signers["kp-1"])))
    statement.check_trusted(key, trusted, 2)
    key.public_key = hpke.public_bytes(hpke.generate_private_key().public_key())  # substituted by a relay
    with pytest.raises(statement.UntrustedKey):
        statement.check_trusted(key, trusted, 2)


def test_a_dp_key_must_be_signed_by_every_holder_a_majority_of_the_pinned_providers() -> None:
    """T of the holders' signatures admit a key; under DP every holder must have signed it: a holder that did
    not could be an impostor's slot, where two quorums would meet and nowhere else."""
    signers = {p: ec.generate_private_key(ec.SECP256R1()) for p in ("kp-0", "kp-1", "kp-2")}
    trusted = {p: k.public_key() for p, k in signers.items()}
    key = _key(list(signers), 2)
    for provider in ("kp-0", "kp-1"):
        key.signatures.append(
            common_pb2.KeySignature(provider_id=provider, signature=statement.sign(key, signers[provider]))
        )
    statement.check_trusted(key, trusted, 2)
    with pytest.raises(statement.UntrustedKey, match="2 valid signature"):
        statement.check_dp_holders(key, trusted)
    key.signatures.append(common_pb2.KeySignature(provider_id="kp-2", signature=statement.sign(key, signers["kp-2"])))
    statement.check_dp_holders(key, trusted)
    with pytest.raises(statement.UntrustedKey, match="not more than half"):
        statement.check_dp_holders(key, {**trusted, "kp-8": trusted["kp-0"], "kp-9": trusted["kp-1"]})


def test_measurement_covers_the_code(tmp_path: Path) -> None:
    copy = tmp_path / "fedcompute"
    shutil.copytree(package_root(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert measure(copy) == measure(package_root())
    assert any(line.startswith("python ") for line in manifest(copy))
    assert any(line.startswith("dist torch==") for line in manifest(copy))
    with (copy / "aggregator" / "fedavg.py").open("a") as handle:
        handle.write("\n# a change\n")
    assert measure(copy) != measure(package_root())
    assert measure(package_root()).startswith("sha256:")


def test_a_provider_identity_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between writing its identity and naming it, a provider leaves no identity (so its next start makes
    one, rather than failing on an empty file forever); processes creating it at once all end up with one."""
    import os
    import threading

    from fedcompute.keys.identity import load_identity, load_or_create_identity

    folder = tmp_path / "kp-0"

    def killed(*_: object) -> None:
        raise KeyboardInterrupt  # stands in for the process dying at that instant

    monkeypatch.setattr(os, "link", killed)
    with pytest.raises(KeyboardInterrupt):
        load_or_create_identity(folder, "kp-0")
    monkeypatch.undo()
    assert load_identity(folder, "kp-0") is None
    assert list(folder.iterdir()) == []
    keys: list[bytes] = []
    starters = [
        threading.Thread(target=lambda: keys.append(statement.public_der(
            load_or_create_identity(folder, "kp-0").signing_key.public_key())))
        for _ in range(8)
    ]  # fmt: skip
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    assert len(keys) == 8
    assert len(set(keys)) == 1
    assert [p.name for p in folder.iterdir()] == ["identity.json"]
    assert (folder / "identity.json").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="belongs to provider 'kp-0', not 'kp-1'"):
        load_identity(folder, "kp-1")


def test_a_provider_naming_another_providers_share_index_is_left_out_of_the_rebuild() -> None:
    """kp-2 answers with share index 1 (its signed statement says kp-2 holds index 3): before 2026-12-02 the worker
    took the index as given, every pair with kp-2 held index 1 twice and Shamir's combine raised out of the rebuild,
    failing the job after the honest providers had released (and charged) for it, on every retry (found by review).
    Now a provider whose index is not the statement's is faulty and left out; kp-0 and kp-1 rebuild the key."""
    from fedcompute.aggregator.keys import JobKeys, KeyAccess
    from fedcompute.v1 import aggregation_pb2

    private = hpke.generate_private_key()
    public = hpke.public_bytes(private.public_key())
    (one, two, _) = split_key(hpke.private_bytes(private), 2, 3)
    published = common_pb2.PublicKey(
        key_id=hpke.key_id_for(public), public_key=public, provider_ids=["kp-0", "kp-1", "kp-2"]
    )
    access = KeyAccess(providers=[], trusted={}, threshold=2, verifier=None, evidence=lambda ids: "")  # type: ignore[arg-type]
    keys = JobKeys(access, aggregation_pb2.AggregationJob(), "", [])
    rebuilt = keys._rebuild({"kp-0": one, "kp-1": two, "kp-2": one}, published)
    assert hpke.public_bytes(rebuilt.public_key()) == public
    assert keys.faulty_providers == {"kp-2"}
