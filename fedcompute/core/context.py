"""The canonical, length-prefixed encoding of a contribution's context (used verbatim as HPKE ``info``).

A device binds its encrypted update to (population, task, round, aggregation id, assignment id, key id, model
version, plan hash, access-policy hash). The aggregator never trusts the copy in the envelope: it parses it,
checks every field against its job, and decrypts with exactly these bytes, so any tampering fails the AEAD.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

MAGIC = b"fedcompute/contribution/v2\x00"


@dataclass(frozen=True)
class ContributionContext:
    population_name: str
    task_id: str
    round: int
    aggregation_id: str
    assignment_id: str
    key_id: str
    model_version: int
    plan_sha256_hex: str
    policy_sha256_hex: str

    def encode(self) -> bytes:
        parts = [MAGIC]
        for text in (self.population_name, self.task_id):
            parts.append(_lp(text))
        parts.append(struct.pack(">Q", self.round))
        for text in (self.aggregation_id, self.assignment_id, self.key_id):
            parts.append(_lp(text))
        parts.append(struct.pack(">Q", self.model_version))
        parts.append(_lp(self.plan_sha256_hex))
        parts.append(_lp(self.policy_sha256_hex))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> ContributionContext:
        """Parse canonical bytes; raise ``ValueError`` on anything that is not exactly one encoding."""
        if not data.startswith(MAGIC):
            raise ValueError("context does not start with the fedcompute contribution magic")
        reader = _Reader(data, len(MAGIC))
        population, task = reader.text(), reader.text()
        rnd = reader.u64()
        aggregation, assignment, key = reader.text(), reader.text(), reader.text()
        version = reader.u64()
        plan, policy = reader.text(), reader.text()
        if reader.pos != len(data):
            raise ValueError("context has trailing bytes")
        ctx = cls(population, task, rnd, aggregation, assignment, key, version, plan, policy)
        if ctx.encode() != data:
            raise ValueError("context is not canonical")
        return ctx


def length_prefixed(text: str) -> bytes:
    """u16 big-endian length || UTF-8 bytes: the string encoding of every canonical structure here."""
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("field longer than 65535 bytes")
    return struct.pack(">H", len(raw)) + raw


_lp = length_prefixed


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("context is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def text(self) -> str:
        (length,) = struct.unpack(">H", self._take(2))
        try:
            return self._take(length).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError("context field is not UTF-8") from exc

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self._take(8))[0]
        return value


ASSIGNMENT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # what a server's ids are (a prefix and URL-safe base64)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def input_set_digest(pairs: list[tuple[str, str]]) -> str:
    """sha256 over the sorted (assignment id, envelope sha256) pairs of a round's contributions. ``ValueError``
    unless every id is 1-128 of ``[A-Za-z0-9_-]`` and every hash 64 lowercase hex: neither then holds the encoding's
    separators (NUL, newline), so one digest is one list. Without the check a server could choose an assignment id
    holding separators and other inputs, and two different lists (overlapping) hashed alike, which the key
    services took for one input set released again (found by review, 2026-12-02)."""
    for assignment_id, blob_sha in pairs:
        if not ASSIGNMENT_ID.fullmatch(assignment_id) or not SHA256_HEX.fullmatch(blob_sha):
            raise ValueError(
                f"input ({assignment_id[:40]!r}, {blob_sha[:70]!r}) is not an assignment id (1-128 of A-Z a-z 0-9 _ -) "
                "and a sha256 (64 lowercase hex)"
            )
    digest = hashlib.sha256(b"fedcompute/input-set/v1\x00")
    for assignment_id, blob_sha in sorted(pairs):
        digest.update(f"{assignment_id}\x00{blob_sha}\n".encode())
    return digest.hexdigest()
