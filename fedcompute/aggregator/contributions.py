"""Opening one contribution: envelope, bound context, decryption, payload checks. Each failure has a reason."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcompute.core import checkpoints
from fedcompute.core.context import ContributionContext
from fedcompute.core.errors import InvalidArgument
from fedcompute.keys import hpke
from fedcompute.keys.envelope import parse_envelope

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
    model_architecture: str
    policy_sha256_hex: str


@dataclass(frozen=True)
class Opened:
    update: dict[str, torch.Tensor]
    num_examples: int


class Rejected(Exception):
    """A contribution left out of the aggregate; ``reason`` is a short label counted in the job result."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def open_contribution(
    envelope_bytes: bytes, assignment_id: str, job: JobContext, keys: Callable[[str], X25519PrivateKey]
) -> Opened:
    """Check and decrypt one contribution; ``keys`` resolves a key id (raising ``Rejected`` if unknown)."""
    try:
        envelope = parse_envelope(envelope_bytes)
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
        plaintext = hpke.open_sealed(envelope.ciphertext, key, expected.encode())
    except hpke.DecryptionError:
        raise Rejected("decrypt_failed") from None
    return _parse_payload(plaintext, job.model_architecture)


def _parse_payload(plaintext: bytes, arch_id: str) -> Opened:
    try:
        update = checkpoints.decode(plaintext)
        checkpoints.check_schema(arch_id, update)
        meta = checkpoints.decode_metadata(plaintext)
    except ValueError:
        raise Rejected("bad_payload") from None
    examples = meta.get("num_examples")
    if not isinstance(examples, int) or not 0 < examples <= MAX_EXAMPLES:
        raise Rejected("bad_payload")
    if not all(math.isfinite(float(t.abs().max())) for t in update.values() if t.numel()):
        raise Rejected("non_finite")
    return Opened(update, examples)
