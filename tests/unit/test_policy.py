"""The access policy: canonical bytes, validation, signatures, the device floor, the worker's obedience, and where a
key service's KEK may come from."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from fedcompute.aggregator.contributions import JobContext, Rejected, open_contribution
from fedcompute.aggregator.obey import PolicyConflict, dp_params
from fedcompute.core.context import ContributionContext
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.policy import AccessPolicy, DeviceFloor, PolicyDp, dp_quorum_violations
from fedcompute.core.settings import Settings
from fedcompute.keys import hpke
from fedcompute.keys.envelope import seal_contribution
from fedcompute.keys.kek import KekUnavailable, load_kek
from fedcompute.keys.policy import UntrustedPolicy, check_signed, from_message, sign, to_message
from fedcompute.v1 import aggregation_pb2, common_pb2

DP = PolicyDp(0.5, 1.2, 10, epsilon=8.0, delta=1e-5, accountant="prv", assumed_population_size=1000)
POLICY = AccessPolicy("pid", "pop", ("sha256:" + "ab" * 32,), 5, DP, plan_sha256_hex="cd" * 32)


def test_message_round_trip_and_distinct_hashes() -> None:
    assert from_message(to_message(POLICY)) == POLICY
    assert from_message(to_message(dataclasses.replace(POLICY, dp=None))).dp is None
    variants = [
        dataclasses.replace(POLICY, min_clients=4),
        dataclasses.replace(POLICY, dp=None),
        dataclasses.replace(POLICY, dp=dataclasses.replace(DP, noise_multiplier=1.1)),
        dataclasses.replace(POLICY, dp=dataclasses.replace(DP, epsilon=8.5)),
        dataclasses.replace(POLICY, policy_id="other"),
        dataclasses.replace(POLICY, allowed_measurements=("sha256:" + "cd" * 32,)),
        dataclasses.replace(POLICY, dp=dataclasses.replace(DP, metric_bounds=(("loss", 5.0),))),
        dataclasses.replace(POLICY, dp=dataclasses.replace(DP, metric_bounds=(("loss", 4.0),))),
    ]
    noised = dataclasses.replace(POLICY, dp=dataclasses.replace(DP, metric_bounds=(("accuracy", 1.0), ("loss", 5.0))))
    assert from_message(to_message(noised)) == noised
    assert len({p.sha256_hex() for p in [POLICY, *variants]}) == len(variants) + 1


@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30))
def test_fields_never_collide(a: str, b: str) -> None:
    one = AccessPolicy(a + b, "pop", ("m",), 1, None, plan_sha256_hex="cd" * 32)
    two = AccessPolicy(a, b + "pop", ("m",), 1, None, plan_sha256_hex="cd" * 32)
    assert one.encode() != two.encode()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": 1}, "policy.version"),
        ({"dp": dataclasses.replace(DP, metric_bounds=(("loss", 5.0), ("accuracy", 1.0)))}, "policy.dp.metric_bounds"),
        ({"dp": dataclasses.replace(DP, metric_bounds=(("f1", 1.0),))}, "policy.dp.metric_bounds"),
        ({"dp": dataclasses.replace(DP, metric_bounds=(("loss", 0.0),))}, "policy.dp.metric_bounds"),
        ({"policy_id": " "}, "policy.policy_id"),
        ({"allowed_measurements": ()}, "policy.allowed_measurements"),
        ({"allowed_measurements": ("b", "a")}, "policy.allowed_measurements"),
        ({"aggregation": "median"}, "policy.aggregation"),
        ({"min_clients": 0}, "policy.min_clients"),
        ({"dp": dataclasses.replace(DP, noise_multiplier=0.0)}, "policy.dp.noise_multiplier"),
        ({"dp": dataclasses.replace(DP, epsilon=math.inf)}, "policy.dp.epsilon"),
        ({"dp": dataclasses.replace(DP, expected_clients=2)}, "policy.dp.expected_clients"),
        ({"dp": dataclasses.replace(DP, accountant="gdp")}, "policy.dp.accountant"),
    ],
)
def test_malformed_policies_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        dataclasses.replace(POLICY, **change).check()  # type: ignore[arg-type]
    assert info.value.field == field


def test_signatures_need_threshold_distinct_trusted_providers() -> None:
    keys = {f"kp-{i}": ec.generate_private_key(ec.SECP256R1()) for i in range(3)}
    trusted = {p: k.public_key() for p, k in keys.items()}
    signed = common_pb2.SignedAccessPolicy(policy=to_message(POLICY))
    signed.signatures.add(provider_id="kp-0", signature=sign(POLICY, keys["kp-0"]))
    signed.signatures.add(provider_id="kp-0", signature=sign(POLICY, keys["kp-0"]))  # a repeat counts once
    signed.signatures.add(provider_id="kp-9", signature=sign(POLICY, ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(UntrustedPolicy, match="1 valid signature"):
        check_signed(signed, trusted, 2)
    signed.signatures.add(provider_id="kp-1", signature=sign(POLICY, keys["kp-1"]))
    assert check_signed(signed, trusted, 2) == POLICY
    signed.policy.min_clients = 1  # weakened after signing
    with pytest.raises(UntrustedPolicy):
        check_signed(signed, trusted, 1)


def test_device_floor() -> None:
    floor = DeviceFloor(require_dp=True, min_clients=5, min_threshold=2, max_key_lifetime_s=86400, max_epsilon=10)
    assert floor.violations(POLICY, 2, 3600) == []
    assert len(floor.violations(dataclasses.replace(POLICY, dp=None, min_clients=3), 1, 2 * 86400)) == 4
    assert floor.violations(dataclasses.replace(POLICY, dp=dataclasses.replace(DP, epsilon=20)), 2, 1)


def test_a_dp_key_must_be_held_by_a_majority_of_the_pinned_providers_and_by_no_other() -> None:
    pinned = {"kp-0": None, "kp-1": None, "kp-2": None}
    assert dp_quorum_violations(["kp-0", "kp-1", "kp-2"], 2, pinned) == []
    assert dp_quorum_violations(["kp-0", "kp-1"], 2, pinned) == []  # a subset, still a majority of the pinned
    assert dp_quorum_violations(["kp-0", "kp-1", "kp-2"], 1, pinned)  # 1 of 3: two groups of one
    assert dp_quorum_violations(["kp-2", "kp-3", "kp-4"], 2, pinned)[0].endswith("does not pin: kp-3, kp-4")
    five = {f"kp-{i}": None for i in range(5)}
    assert dp_quorum_violations(["kp-0", "kp-1", "kp-2"], 2, five)  # 2 of {0,1,2} and 2 of {2,3,4}: disjoint
    assert dp_quorum_violations(["kp-0", "kp-1", "kp-2", "kp-3", "kp-4"], 3, five) == []


def _job(**dp: object) -> aggregation_pb2.AggregationJob:
    params = aggregation_pb2.DpParams(
        enabled=True, clip_norm=0.5, noise_multiplier=1.2, expected_clients=10, min_clients=5
    )
    for name, value in dp.items():
        setattr(params, name, value)
    return aggregation_pb2.AggregationJob(population_name="pop", dp=params)


def test_the_worker_takes_dp_from_the_policy_and_refuses_a_job_that_differs() -> None:
    assert dp_params(POLICY, _job()) is not None
    changes: list[tuple[dict[str, object], str]] = [
        ({"enabled": False}, "switches differential privacy off"),
        ({"noise_multiplier": 0.1}, "dp.noise_multiplier"),
        ({"clip_norm": 5.0}, "dp.clip_norm"),
        ({"expected_clients": 100}, "dp.expected_clients"),
        ({"min_clients": 1}, "dp.min_clients"),
    ]
    for change, problem in changes:
        with pytest.raises(PolicyConflict, match=problem):
            dp_params(POLICY, _job(**change))
    with pytest.raises(PolicyConflict, match="population"):
        dp_params(POLICY, aggregation_pb2.AggregationJob(population_name="elsewhere"))
    assert (
        dp_params(dataclasses.replace(POLICY, dp=None), aggregation_pb2.AggregationJob(population_name="pop")) is None
    )


def test_a_contribution_bound_to_another_policy_is_never_opened() -> None:
    key = hpke.generate_private_key()
    job = JobContext("pop", "t", 1, "agg", 1, "ab" * 32, POLICY.sha256_hex(), {})
    other = ContributionContext("pop", "t", 1, "agg", "asg", "k", 1, "ab" * 32, "ee" * 32)
    envelope = seal_contribution(b"x", other, hpke.public_bytes(key.public_key())).SerializeToString()
    with pytest.raises(Rejected) as info:
        open_contribution(envelope, "asg", job, lambda _: key)
    assert info.value.reason == "policy_mismatch"


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(workdir=tmp_path, provider_id="kp-0", **values)  # type: ignore[arg-type]


def test_the_kek_comes_from_a_secret_apart_from_the_shares(tmp_path: Path) -> None:
    outside = tmp_path / "secrets" / "kek"
    outside.parent.mkdir()
    outside.write_text("11" * 32)
    assert load_kek(_settings(tmp_path, key_encryption_key="22" * 32)) == bytes.fromhex("22" * 32)
    assert load_kek(_settings(tmp_path, key_encryption_key_file=outside)) == bytes.fromhex("11" * 32)
    generated = load_kek(_settings(tmp_path))  # development: generated outside the data directory
    assert (tmp_path / "kek" / "kp-0.key").read_text() == generated.hex()
    assert not any(generated.hex() in p.read_text() for p in (tmp_path / "keys").rglob("*") if p.is_file())
    inside = tmp_path / "keys" / "kp-0" / "kek"
    inside.parent.mkdir(parents=True)
    inside.write_text("33" * 32)
    with pytest.raises(KekUnavailable, match="inside the key service's data directory"):
        load_kek(_settings(tmp_path, key_encryption_key_file=inside, attestation_policy="production"))
    with pytest.raises(KekUnavailable, match="no KEK configured"):
        load_kek(_settings(tmp_path, attestation_policy="production"))
    with pytest.raises(KekUnavailable, match="32 bytes"):
        load_kek(_settings(tmp_path, key_encryption_key="ab"))
