"""A task's access policy: who may aggregate its devices' updates, how, and within which privacy budget.

One canonical encoding, shared by every party: the operator builds it, each key service checks and signs it and
enforces it as the ledger, devices verify the signatures and their own floor and bind its sha256 into every
upload (HPKE ``info``), and the attested aggregator applies it. Byte layout (docs/protocol.md):

    "fedcompute/access-policy/v1\\0" || u32 version || lp(policy_id) || lp(population) || lp(plan_sha256_hex)
    || u16 count || lp(measurement)... || lp(aggregation) || u32 min_clients || u8 dp_enabled
    [ || f64 clip_norm || f64 noise_multiplier || u32 expected_clients || u8 adaptive_clip
      || f64 target_unclipped_quantile || f64 clip_learning_rate || f64 clipped_count_stddev
      || f64 epsilon || f64 delta || lp(accountant) || u64 assumed_population_size
      || u16 count || (lp(metric) || f64 bound)... ]   (only when dp_enabled; metrics noised, sorted by name)

lp(x) = u16 length || UTF-8 bytes; integers big-endian; f64 = IEEE 754 binary64 big-endian.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from fedcompute.core.context import length_prefixed as _lp
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.plans import METRICS
from fedcompute.core.plans import parse as parse_plan
from fedcompute.core.privacy import ACCOUNTANTS, update_noise_multiplier
from fedcompute.core.tasks import TaskSpec

MAGIC = b"fedcompute/access-policy/v1\x00"
VERSION = 2
FEDAVG = "fedavg"


@dataclass(frozen=True)
class PolicyDp:
    clip_norm: float
    noise_multiplier: float
    expected_clients: int
    epsilon: float
    delta: float
    accountant: str
    assumed_population_size: int
    adaptive_clip: bool = False
    target_unclipped_quantile: float = 0.0
    clip_learning_rate: float = 0.0
    clipped_count_stddev: float = 0.0
    metric_bounds: tuple[tuple[str, float], ...] = ()  # metrics released noised, each clipped to [0, bound]

    @property
    def sample_rate(self) -> float:
        return self.expected_clients / self.assumed_population_size

    def update_multiplier(self) -> float:
        """The multiplier the aggregator applies to the update (and metrics) for the accounted one."""
        count = self.clipped_count_stddev if self.adaptive_clip else 0.0
        return update_noise_multiplier(self.noise_multiplier, count, bool(self.metric_bounds))

    def encode(self) -> bytes:
        return b"".join(
            [
                struct.pack(">ddIB", self.clip_norm, self.noise_multiplier, self.expected_clients, self.adaptive_clip),
                struct.pack(">ddd", self.target_unclipped_quantile, self.clip_learning_rate, self.clipped_count_stddev),
                struct.pack(">dd", self.epsilon, self.delta),
                _lp(self.accountant),
                struct.pack(">QH", self.assumed_population_size, len(self.metric_bounds)),
                *(_lp(name) + struct.pack(">d", bound) for name, bound in self.metric_bounds),
            ]
        )


@dataclass(frozen=True)
class AccessPolicy:
    policy_id: str
    population_name: str
    allowed_measurements: tuple[str, ...]
    min_clients: int
    dp: PolicyDp | None
    aggregation: str = FEDAVG
    version: int = VERSION
    plan_sha256_hex: str = ""  # the only plan devices may run and the aggregator may aggregate under this policy

    def encode(self) -> bytes:
        parts = [MAGIC, struct.pack(">I", self.version), _lp(self.policy_id), _lp(self.population_name)]
        parts.append(_lp(self.plan_sha256_hex))
        parts.append(struct.pack(">H", len(self.allowed_measurements)))
        parts += [_lp(m) for m in self.allowed_measurements]
        parts += [_lp(self.aggregation), struct.pack(">IB", self.min_clients, self.dp is not None)]
        if self.dp is not None:
            parts.append(self.dp.encode())
        return b"".join(parts)

    def sha256_hex(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    def check(self) -> None:
        """Raise ``InvalidArgument`` naming the first field that makes this policy malformed."""
        if self.version != VERSION:
            raise InvalidArgument("policy.version", f"must be {VERSION}, got {self.version}")
        if not self.policy_id.strip():
            raise InvalidArgument("policy.policy_id", "must not be empty")
        if not self.population_name.strip():
            raise InvalidArgument("policy.population_name", "must not be empty")
        if len(self.plan_sha256_hex) != 64 or set(self.plan_sha256_hex) - set("0123456789abcdef"):
            raise InvalidArgument("policy.plan_sha256_hex", "must be the plan's sha256 (64 lowercase hex characters)")
        ms = self.allowed_measurements
        if not ms or list(ms) != sorted(set(ms)) or not all(m.strip() for m in ms):
            raise InvalidArgument("policy.allowed_measurements", "must be a non-empty, sorted list of distinct values")
        if self.aggregation != FEDAVG:
            raise InvalidArgument("policy.aggregation", f"must be {FEDAVG!r}, got {self.aggregation!r}")
        if self.min_clients < 1:
            raise InvalidArgument("policy.min_clients", "must be >= 1")
        if self.dp is not None:
            _check_dp(self.dp, self.min_clients)
        try:
            self.encode()
        except (struct.error, ValueError) as exc:
            raise InvalidArgument("policy", f"cannot be encoded: {exc}") from None


def _check_dp(dp: PolicyDp, min_clients: int) -> None:
    numbers = ("clip_norm", "noise_multiplier", "epsilon", "delta", "target_unclipped_quantile", "clip_learning_rate")
    for name in (*numbers, "clipped_count_stddev"):
        if not math.isfinite(getattr(dp, name)):
            raise InvalidArgument(f"policy.dp.{name}", "must be finite")
    if dp.clipped_count_stddev < 0 or dp.clip_learning_rate < 0:
        raise InvalidArgument("policy.dp.clipped_count_stddev", "and clip_learning_rate must be >= 0")
    if dp.clip_norm <= 0:
        raise InvalidArgument("policy.dp.clip_norm", "must be > 0")
    if dp.noise_multiplier <= 0:
        raise InvalidArgument("policy.dp.noise_multiplier", "must be > 0 (DP without noise protects nothing)")
    if dp.expected_clients < min_clients:
        raise InvalidArgument("policy.dp.expected_clients", f"must be >= min_clients ({min_clients})")
    if dp.epsilon <= 0:
        raise InvalidArgument("policy.dp.epsilon", "must be > 0")
    if not 0 < dp.delta < 1:
        raise InvalidArgument("policy.dp.delta", "must be in (0, 1)")
    if dp.accountant not in ACCOUNTANTS:
        raise InvalidArgument("policy.dp.accountant", f"must be one of {', '.join(ACCOUNTANTS)}")
    if dp.assumed_population_size < dp.expected_clients:
        raise InvalidArgument("policy.dp.assumed_population_size", "must be >= expected_clients")
    if dp.adaptive_clip and not 0 < dp.target_unclipped_quantile < 1:
        raise InvalidArgument("policy.dp.target_unclipped_quantile", "must be in (0, 1)")
    names = [name for name, _ in dp.metric_bounds]
    if names != sorted(set(names)) or not set(names) <= set(METRICS):
        raise InvalidArgument("policy.dp.metric_bounds", f"must name distinct metrics of {METRICS}, sorted")
    if not all(math.isfinite(bound) and bound > 0 for _, bound in dp.metric_bounds):
        raise InvalidArgument("policy.dp.metric_bounds", "every bound must be finite and > 0")


def for_task(spec: TaskSpec, policy_id: str, measurements: Sequence[str]) -> AccessPolicy:
    """The policy of a validated, resolved spec (DP noise multiplier already calibrated)."""
    dp = None
    if spec.dp is not None:
        d = spec.dp
        dp = PolicyDp(
            clip_norm=d.l2_clip_norm,
            noise_multiplier=d.noise_multiplier,
            expected_clients=spec.report_goal,
            epsilon=d.target_epsilon,
            delta=d.target_delta,
            accountant=d.accountant,
            assumed_population_size=d.assumed_population_size,
            adaptive_clip=d.adaptive_clip,
            target_unclipped_quantile=d.target_unclipped_quantile if d.adaptive_clip else 0.0,
            clip_learning_rate=d.clip_learning_rate if d.adaptive_clip else 0.0,
            clipped_count_stddev=d.count_stddev(spec.report_goal) if d.adaptive_clip else 0.0,
            metric_bounds=d.metric_bounds(parse_plan(spec.plan_bytes()).metrics if d.noise_metrics else ()),
        )
    return AccessPolicy(
        policy_id=policy_id,
        population_name=spec.population_name,
        allowed_measurements=tuple(sorted(set(measurements))),
        min_clients=spec.min_clients_or_default(),
        dp=dp,
        plan_sha256_hex=hashlib.sha256(spec.plan_bytes()).hexdigest(),
    )


@dataclass(frozen=True)
class DeviceFloor:
    """The weakest policy and key a device accepts, whatever the server relays (its own configuration)."""

    require_dp: bool = False
    min_clients: int = 1
    min_threshold: int = 1
    max_key_lifetime_s: int = 400 * 86400
    max_epsilon: float = math.inf

    def violations(self, policy: AccessPolicy, key_threshold: int, key_lifetime_s: int) -> list[str]:
        """Why this device must refuse to upload under ``policy`` and a key with these properties (empty: fine)."""
        found = []
        if self.require_dp and policy.dp is None:
            found.append("the policy has no differential privacy and this device requires it")
        if policy.min_clients < self.min_clients:
            found.append(f"the policy allows releases of {policy.min_clients} contributions, floor {self.min_clients}")
        if policy.dp is not None and policy.dp.epsilon > self.max_epsilon:
            found.append(f"the policy's epsilon {policy.dp.epsilon:g} exceeds this device's {self.max_epsilon:g}")
        if key_threshold < self.min_threshold:
            found.append(f"the key needs {key_threshold} key services to release it, floor {self.min_threshold}")
        if key_lifetime_s > self.max_key_lifetime_s:
            found.append(f"the key lives {key_lifetime_s} s, longer than this device's {self.max_key_lifetime_s} s")
        return found


def dp_quorum_violations(provider_ids: Collection[str], threshold: int, pinned: Collection[str]) -> list[str]:
    """Under DP, why a key (its ``provider_ids`` and Shamir ``threshold``) cannot carry a device's contributions
    (empty: it can). Key services number DP releases over each other (docs/protocol.md A.5), which counts every
    release only if any two sets of key services that can release a key of the task share one: so each key must be
    held only by providers the device pins, and need more than half of them (t > n/2 of the pinned). A key dealt
    to other providers, or to too few, could be released by a group that never sees another group's count."""
    found = []
    unpinned = sorted(set(provider_ids) - set(pinned))
    if unpinned:
        found.append(f"the DP task's key is held by providers this device does not pin: {', '.join(unpinned)}")
    if 2 * threshold <= len(pinned):
        found.append(
            f"the DP task's key needs {threshold} key services to release it, not more than half of the "
            f"{len(pinned)} this device pins"
        )
    return found
