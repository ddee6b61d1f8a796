"""t-of-n Shamir sharing of a 32-byte X25519 private key (pycryptodome, GF(2^128)).

pycryptodome shares 16-byte secrets, so each half is split with the same indices; share i is the
concatenation of both halves' share i. Plain Shamir has no integrity check: callers verify the rebuilt key
against the published public key.
"""

from __future__ import annotations

from Crypto.Protocol.SecretSharing import Shamir


def split_key(secret: bytes, threshold: int, shares: int) -> list[tuple[int, bytes]]:
    if len(secret) != 32:
        raise ValueError("the secret must be 32 bytes")
    if not 1 <= threshold <= shares:
        raise ValueError(f"threshold must be in [1, {shares}], got {threshold}")
    if threshold == 1:  # pycryptodome needs k >= 2; a 1-of-n "share" is the secret itself
        return [(i, secret) for i in range(1, shares + 1)]
    low = Shamir.split(threshold, shares, secret[:16])
    high = Shamir.split(threshold, shares, secret[16:])
    return [(i, a + b) for (i, a), (j, b) in zip(low, high, strict=True) if i == j]


def combine_key(shares: list[tuple[int, bytes]], threshold: int) -> bytes:
    """Rebuild from exactly ``threshold`` shares."""
    if len(shares) != threshold:
        raise ValueError(f"exactly {threshold} shares are needed, got {len(shares)}")
    if any(len(s) != 32 for _, s in shares):
        raise ValueError("every share must be 32 bytes")
    if threshold == 1:
        return shares[0][1]
    low = Shamir.combine([(i, s[:16]) for i, s in shares])
    high = Shamir.combine([(i, s[16:]) for i, s in shares])
    return low + high
