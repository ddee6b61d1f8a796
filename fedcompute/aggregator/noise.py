"""Gaussian noise for DP from a cryptographically secure source.

A ChaCha20 keystream (``cryptography``), keyed with 32 bytes from the OS CSPRNG (``os.urandom``), gives 64-bit
words; the top 53 bits make uniforms in [0, 1); Box–Muller turns pairs into standard normals in float64.
Hardening against floating-point attacks (Mironov 2012; arXiv:2107.10138, 2112.05307): every released sample
is the sum of four independent normals divided by 2 (still N(0, 1)), as Opacus' secure mode does, so the
low-order bits of one Box–Muller output cannot be read back from the result. ``torch.Generator`` and NumPy's
default generator are never used for noise. Tests pass a fixed key for reproducibility.
"""

from __future__ import annotations

import os
import struct
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_TWO_PI = 2.0 * np.pi
_SCALE = 2.0**-53


class NoiseSource(Protocol):
    def gaussian(self, count: int, std: float) -> np.ndarray: ...


def derive_noise_key(key_material: bytes, policy_sha256_hex: str, round_: int, input_set_sha256_hex: str) -> bytes:
    """The noise key of one release: HKDF-SHA256 over the population private key(s) the worker rebuilt, bound to
    (policy, round, input set). Only attested code holding the key can compute it, and a repeated release of the
    same input set (a retried job) reproduces the same noise, so the two outputs cannot be averaged."""
    info = b"fedcompute/dp-noise/v1\x00" + policy_sha256_hex.encode() + struct.pack(">Q", round_)
    return HKDF(hashes.SHA256(), 32, salt=None, info=info + input_set_sha256_hex.encode()).derive(key_material)


class ChaChaGaussian:
    """Standard-normal samples from a ChaCha20 keystream; ``secure()`` keys it from the OS CSPRNG."""

    def __init__(self, key: bytes, nonce: bytes = b"\x00" * 16) -> None:
        if len(key) != 32 or len(nonce) != 16:
            raise ValueError("ChaCha20 needs a 32-byte key and a 16-byte nonce")
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    @classmethod
    def secure(cls) -> ChaChaGaussian:
        return cls(os.urandom(32), os.urandom(16))

    def _uniforms(self, count: int) -> np.ndarray:
        words = np.frombuffer(self._stream.update(b"\x00" * (8 * count)), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * _SCALE

    def _normals(self, count: int) -> np.ndarray:
        pairs = (count + 1) // 2
        u1 = 1.0 - self._uniforms(pairs)  # (0, 1]: log is finite
        u2 = self._uniforms(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        out = np.concatenate([radius * np.cos(_TWO_PI * u2), radius * np.sin(_TWO_PI * u2)])
        return out[:count]

    def gaussian(self, count: int, std: float) -> np.ndarray:
        """``count`` samples of N(0, std²) in float64 (each the hardened sum of four normals / 2)."""
        if count <= 0:
            return np.zeros(0)
        if std == 0:
            return np.zeros(count)
        four = self._normals(4 * count).reshape(4, count)
        samples: np.ndarray = std * four.sum(axis=0) / 2.0
        return samples
