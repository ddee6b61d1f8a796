"""Opening one contribution: envelope, bound context, decryption, payload checks. Each failure has a reason."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcompute.aggregator.dp import l2_norm
from fedcompute.core import checkpoints
from fedcompute.core.context import ContributionContext
from fedcompute.core.errors import InvalidArgument
from fedcompute.keys import hpke
from fedcompute.keys.envelope import envelope_view

MAX_EXAMPLES = 1_000_000


@dataclass(frozen=True)
class JobContext:
    """What every contribution of one job must be bound to."""

    population_name: str
    task_id: str
    round: int
    aggregation_id: str
    model_version: int
    plan_sha256_hex: str
    policy_sha256_hex: str
    schema: Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # from the plan, once per job
    metrics: tuple[str, ...] = ()  # the plan's metrics, which contributions may report


@dataclass(frozen=True)
class Opened:
    update: dict[str, torch.Tensor]  # views of the decrypted payload: read, never written
    num_examples: int
    metrics: dict[str, float]
    norm: float | None = None  # the update's global L2 norm (float64), when asked for: DP clips by it


class Rejected(Exception):
    """A contribution left out of the aggregate; ``reason`` is a short label counted in the job result."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def open_contribution(
    envelope_bytes: bytes | memoryview,
    assignment_id: str,
    job: JobContext,
    keys: Callable[[str], X25519PrivateKey],
    norm: bool = False,
) -> Opened:
    """Check and decrypt one contribution; ``keys`` resolves a key id (raising ``Rejected`` if unknown). With
    ``norm`` the update's L2 norm is computed here too (on the opening thread, not the summing one). The envelope's
    ciphertext is opened in place and the payload's tensors view the plaintext: no copy of either is made."""
    try:
        envelope, ciphertext = envelope_view(envelope_bytes)
        context = ContributionContext.decode(envelope.context)
    except (InvalidArgument, ValueError):
        raise Rejected("malformed_envelope") from None
    expected = ContributionContext(
        job.population_name,
        job.task_id,
        job.round,
        job.aggregation_id,
        assignment_id,
        envelope.key_id,
        job.model_version,
        job.plan_sha256_hex,
        job.policy_sha256_hex,
    )
    if context.policy_sha256_hex != job.policy_sha256_hex:
        raise Rejected("policy_mismatch")  # sealed under another access policy: never opened here
    if context != expected:
        raise Rejected("context_mismatch")
    key = keys(envelope.key_id)
    try:
        plaintext = hpke.open_sealed(ciphertext, key, expected.encode())
    except hpke.DecryptionError:
        raise Rejected("decrypt_failed") from None
    return _parse_payload(plaintext, job, norm)


def _parse_payload(plaintext: bytes, job: JobContext, norm: bool = False) -> Opened:
    try:
        update, meta = checkpoints.decode_views(plaintext, job.schema)  # names, shapes and dtypes: the plan's
    except ValueError:
        raise Rejected("bad_payload") from None
    examples = meta.get("num_examples")
    if not isinstance(examples, int) or isinstance(examples, bool) or not 0 < examples <= MAX_EXAMPLES:
        raise Rejected("bad_payload")
    size = l2_norm(update) if norm else None
    # a finite float64 norm means every value is finite (NaN and inf propagate); otherwise look value by value
    if not (size is not None and math.isfinite(size)) and not all(_finite(t) for t in update.values()):
        raise Rejected("non_finite")
    return Opened(update, examples, _metrics(meta.get("metrics", {}), job.metrics), size)


def _finite(t: torch.Tensor) -> bool:
    """Every value finite: min and max in one pass, no copy (NaN propagates to both)."""
    return not t.numel() or all(math.isfinite(float(v)) for v in torch.aminmax(t))


def _metrics(reported: object, allowed: tuple[str, ...]) -> dict[str, float]:
    """A contribution's metrics: only the plan's, each a finite number in its range (else ``bad_metrics``)."""
    if not isinstance(reported, dict) or not set(reported) <= set(allowed):
        raise Rejected("bad_metrics")
    out: dict[str, float] = {}
    for name, value in reported.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Rejected("bad_metrics")
        if value < 0 or (name != "loss" and value > 1):
            raise Rejected("bad_metrics")
        out[name] = float(value)
    return out
