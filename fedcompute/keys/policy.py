"""Access policies on the wire: message <-> domain policy, provider signatures, and the check every party runs.

A provider signs the canonical policy bytes (``core/policy.py``), which begin with their own magic, so a policy
signature can never be taken for a key-statement signature or the reverse.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.core.errors import InvalidArgument
from fedcompute.core.policy import AccessPolicy, PolicyDp
from fedcompute.keys import statement
from fedcompute.v1 import common_pb2


class UntrustedPolicy(Exception):
    """A relayed access policy is malformed or lacks enough valid signatures from the trusted providers."""


def from_message(msg: common_pb2.AccessPolicy) -> AccessPolicy:
    dp = None
    if msg.dp.enabled:
        d = msg.dp
        dp = PolicyDp(
            clip_norm=d.clip_norm,
            noise_multiplier=d.noise_multiplier,
            expected_clients=d.expected_clients,
            epsilon=d.epsilon,
            delta=d.delta,
            accountant=d.accountant,
            assumed_population_size=d.assumed_population_size,
            adaptive_clip=d.adaptive_clip,
            target_unclipped_quantile=d.target_unclipped_quantile,
            clip_learning_rate=d.clip_learning_rate,
            clipped_count_stddev=d.clipped_count_stddev,
            metric_bounds=tuple((b.name, b.bound) for b in d.metric_bounds),
        )
    return AccessPolicy(
        policy_id=msg.policy_id,
        population_name=msg.population_name,
        allowed_measurements=tuple(msg.allowed_measurements),
        min_clients=msg.min_clients,
        dp=dp,
        aggregation=msg.aggregation,
        version=msg.version,
        plan_sha256_hex=msg.plan_sha256_hex,
    )


def to_message(policy: AccessPolicy) -> common_pb2.AccessPolicy:
    msg = common_pb2.AccessPolicy(
        version=policy.version,
        policy_id=policy.policy_id,
        population_name=policy.population_name,
        allowed_measurements=list(policy.allowed_measurements),
        aggregation=policy.aggregation,
        min_clients=policy.min_clients,
        plan_sha256_hex=policy.plan_sha256_hex,
    )
    if policy.dp is not None:
        d = policy.dp
        msg.dp.CopyFrom(
            common_pb2.PolicyDp(
                enabled=True,
                clip_norm=d.clip_norm,
                noise_multiplier=d.noise_multiplier,
                expected_clients=d.expected_clients,
                adaptive_clip=d.adaptive_clip,
                target_unclipped_quantile=d.target_unclipped_quantile,
                clip_learning_rate=d.clip_learning_rate,
                clipped_count_stddev=d.clipped_count_stddev,
                epsilon=d.epsilon,
                delta=d.delta,
                accountant=d.accountant,
                assumed_population_size=d.assumed_population_size,
                metric_bounds=[common_pb2.MetricBound(name=n, bound=b) for n, b in d.metric_bounds],
            )
        )
    return msg


def sign(policy: AccessPolicy, signing_key: ec.EllipticCurvePrivateKey) -> bytes:
    return statement.sign_bytes(policy.encode(), signing_key)


def check_signed(
    signed: common_pb2.SignedAccessPolicy, trusted: Mapping[str, ec.EllipticCurvePublicKey], threshold: int
) -> AccessPolicy:
    """The policy, if well formed and validly signed by ``threshold`` distinct trusted providers."""
    policy = from_message(signed.policy)
    try:
        policy.check()
    except InvalidArgument as exc:
        raise UntrustedPolicy(f"the access policy is malformed: {exc.public_message}") from None
    data = policy.encode()
    valid = {
        s.provider_id
        for s in signed.signatures
        if s.provider_id in trusted and statement.verify_signature(data, s.signature, trusted[s.provider_id])
    }
    if len(valid) < threshold:
        raise UntrustedPolicy(
            f"access policy {policy.sha256_hex()[:16]}… has {len(valid)} valid signature(s) from trusted key "
            f"services, {threshold} needed"
        )
    return policy
