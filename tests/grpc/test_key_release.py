"""Key services as relying parties: each checks the attestation result, its policy and its release ledger."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedcompute.attestation.measure import measure
from fedcompute.attestation.results import Appraisal, ReleaseBinding, mint_result
from fedcompute.clients.typed import KeyClient
from fedcompute.core.clock import FakeClock, RandomIds
from fedcompute.core.secrets import load_or_create_ec_key
from fedcompute.keys import hpke
from fedcompute.rpc.channels import open_channel
from fedcompute.v1 import key_pb2
from tests.harness import Harness, suite_settings, wait_for

ids = RandomIds()


def _clients(harness: Harness) -> list[KeyClient]:
    return [KeyClient(open_channel(a), 10.0) for a in harness.suite.key_addresses]


def _key_id(harness: Harness) -> str:
    harness.create_task("relying")
    keys = harness.keys.get_public_keys(key_pb2.GetPublicKeysRequest(population_name="relying")).keys
    return keys[0].key_id


def _binding(key_id: str, input_set: str = "ab" * 32) -> ReleaseBinding:
    recipient = hpke.public_bytes(hpke.generate_private_key().public_key())
    return ReleaseBinding(recipient, key_id, "task_x", 1, "agg_x", "job_x", input_set)


def _result(harness: Harness, binding: ReleaseBinding, when: datetime | None = None, **appraisal: Any) -> str:
    """An attestation result signed with the verifier's key, as a (possibly fooled) verifier would issue."""
    key = load_or_create_ec_key(harness.suite.settings.workdir / "secrets" / "verifier.pem")
    values = Appraisal(measure(), "LOCAL_SOFTWARE", "disabled-since-boot", "fedcompute/aggregator/v1")
    return mint_result(
        key,
        "fedcompute-verifier",
        ["kp-0", "kp-1", "kp-2"],
        replace(values, **appraisal),
        binding.digest(),
        binding.recipient_public_key,
        when or datetime.now(UTC),
        ids.new_id("ar"),
    )


def _release(client: KeyClient, binding: ReleaseBinding, result: str) -> key_pb2.ReleaseKeyShareResponse:
    return client.release_key_share(key_pb2.ReleaseKeyShareRequest(attestation_result=result, **binding.fields()))


def _denied_everywhere(harness: Harness, binding: ReleaseBinding, result: str, problem: str) -> None:
    for client in _clients(harness):
        with pytest.raises(grpc.RpcError) as info:
            _release(client, binding, result)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert problem in (info.value.details() or "")


def test_valid_result_releases_one_sealed_share_per_provider(harness: Harness) -> None:
    binding = _binding(_key_id(harness))
    result = _result(harness, binding)
    replies = [_release(c, binding, result) for c in _clients(harness)]
    assert sorted(r.share_index for r in replies) == [1, 2, 3]
    assert all(len(r.encrypted_share) == 32 + 32 + 16 for r in replies)


@pytest.mark.parametrize(
    ("appraisal", "problem"),
    [
        ({"measurement": "sha256:" + "00" * 32}, "measurement"),
        ({"dbgstat": "enabled"}, "debugging"),
        ({"hwmodel": "SOMETHING_ELSE"}, "hardware model"),
    ],
)
def test_results_outside_policy_are_refused_by_every_key_service(
    harness: Harness, appraisal: dict[str, Any], problem: str
) -> None:
    binding = _binding(_key_id(harness))
    _denied_everywhere(harness, binding, _result(harness, binding, **appraisal), problem)


def test_expired_replayed_missing_and_misbound_results_are_refused(harness: Harness) -> None:
    binding = _binding(_key_id(harness))
    old = _result(harness, binding, when=datetime.now(UTC) - timedelta(minutes=10))
    _denied_everywhere(harness, binding, old, "expired")
    _denied_everywhere(harness, binding, "", "required")
    result = _result(harness, binding)
    other = _binding(binding.key_id)  # another recipient key, same result
    _denied_everywhere(harness, other, result, "bound to another request")
    client = _clients(harness)[0]
    _release(client, binding, result)
    with pytest.raises(grpc.RpcError) as info:
        _release(client, binding, result)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "replay" in (info.value.details() or "")


def test_release_ledger_pins_the_first_input_set(harness: Harness) -> None:
    key_id = _key_id(harness)
    first = _binding(key_id, "aa" * 32)
    client = _clients(harness)[1]
    _release(client, first, _result(harness, first))
    retry = replace(_binding(key_id, "aa" * 32))
    _release(client, retry, _result(harness, retry))  # a crashed job's retry, same input set: allowed
    changed = _binding(key_id, "bb" * 32)
    with pytest.raises(grpc.RpcError) as info:
        _release(client, changed, _result(harness, changed))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "different input set" in (info.value.details() or "")


def test_admin_calls_need_the_token_and_unknown_keys_are_not_found(harness: Harness) -> None:
    client = _clients(harness)[0]
    with pytest.raises(grpc.RpcError) as info:
        client.activate_key(key_pb2.ActivateKeyRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    binding = _binding("k_missing")
    with pytest.raises(grpc.RpcError) as info:
        _release(client, binding, _result(harness, binding))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_shares_are_destroyed_after_their_destruction_time(tmp_path: Path, database_url: str) -> None:
    clock = FakeClock(datetime.now(UTC))
    settings = suite_settings(
        tmp_path / "w", database_url, key_lifetime_s=3600, key_destroy_after_s=60, key_rotate_before_s=600
    )
    from fedcompute.suite import start_suite

    suite = start_suite(settings, clock=clock, aggregator=False)
    harness = Harness.attach(suite)
    try:
        binding = _binding(_key_id(harness))
        request = key_pb2.GetPublicKeysRequest(population_name="relying")
        clock.advance(timedelta(seconds=3600 - 600 + 1))  # inside the rotation window: the next key is published
        wait_for(lambda: len(harness.keys.get_public_keys(request).keys) == 2, 30, "the rotated key")
        first, second = sorted(harness.keys.get_public_keys(request).keys, key=lambda k: k.expiration_time_unix)
        assert first.key_id == binding.key_id
        assert second.expiration_time_unix > first.expiration_time_unix
        clock.advance(timedelta(seconds=600 + 61))  # past the first key's destruction time
        for address in suite.key_addresses:
            with pytest.raises(grpc.RpcError) as info:
                _release(KeyClient(open_channel(address), 10.0), binding, _result(harness, binding, when=clock.now()))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "destroyed" in (info.value.details() or "")
        for i in range(3):
            stored = json.loads((tmp_path / "w" / "keys" / f"kp-{i}" / "keyset.json").read_text())
            key = stored["keys"][binding.key_id]  # the dealer may have rotated in a new key meanwhile
            assert key["destroyed"] is True
            assert key["sealed_share_hex"] == ""
    finally:
        harness.stop()
