"""Gaussian noise for DP from a cryptographically secure source.

A ChaCha20 keystream (``cryptography``), keyed with 32 bytes from the OS CSPRNG (``os.urandom``), gives 64-bit
words; the top 53 bits make uniforms in [0, 1); Box–Muller turns pairs into standard normals in float64.
Hardening against floating-point attacks (Mironov 2012; arXiv:2107.10138, 2112.05307): every released sample
is the sum of four independent normals divided by 2 (still N(0, 1)), as Opacus' secure mode does, so the
low-order bits of one Box–Muller output cannot be read back from the result. ``torch.Generator`` and NumPy's
default generator are never used for noise. Tests pass a fixed key for reproducibility.

Samples are made in blocks of ``BLOCK`` (the last one shorter), each from the next 4·n keystream words: n pairs
of uniforms (u1 from the first 2n words, u2 from the next 2n), whose 4n normals (the cosines, then the sines)
are summed in four rows of n. So memory stays bounded by one block, and asking for ``BLOCK`` samples k times
gives the same samples as asking for k·BLOCK at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_TWO_PI = 2.0 * np.pi
_SCALE = 2.0**-53
BLOCK = 1 << 16  # samples per block: 2 MiB of keystream


class NoiseSource(Protocol):
    def gaussian(self, count: int, std: float) -> np.ndarray: ...


class ChaChaGaussian:
    """Standard-normal samples from a ChaCha20 keystream; ``secure()`` keys it from the OS CSPRNG."""

    def __init__(self, key: bytes, nonce: bytes = b"\x00" * 16) -> None:
        if len(key) != 32 or len(nonce) != 16:
            raise ValueError("ChaCha20 needs a 32-byte key and a 16-byte nonce")
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._zeros = bytes(32 * BLOCK)  # 4 words of 8 bytes per sample
        self._words = bytearray(32 * BLOCK)

    @classmethod
    def secure(cls) -> ChaChaGaussian:
        return cls(os.urandom(32), os.urandom(16))

    def _block(self, n: int, out: np.ndarray) -> None:
        """``n`` <= BLOCK hardened standard normals into ``out``, from the next 4·n keystream words."""
        size = 32 * n
        self._stream.update_into(memoryview(self._zeros)[:size], self._words)
        words = np.frombuffer(self._words, dtype="<u8", count=4 * n)
        uniforms = (words >> np.uint64(11)).astype(np.float64)
        uniforms *= _SCALE
        u1, u2 = uniforms[: 2 * n], uniforms[2 * n :]
        np.subtract(1.0, u1, out=u1)  # (0, 1]: log is finite
        np.log(u1, out=u1)
        u1 *= -2.0
        radius = np.sqrt(u1, out=u1)
        u2 *= _TWO_PI
        sines = np.sin(u2)
        np.cos(u2, out=u2)
        u2 *= radius  # the 2n cosine normals
        sines *= radius
        np.add(u2[:n], u2[n:], out=out)  # rows in order: cosines 0..n, n..2n, then sines 0..n, n..2n
        out += sines[:n]
        out += sines[n:]

    def gaussian(self, count: int, std: float) -> np.ndarray:
        """``count`` samples of N(0, std²) in float64 (each the hardened sum of four normals / 2)."""
        if count <= 0:
            return np.zeros(0)
        if std == 0:
            return np.zeros(count)
        samples = np.empty(count, dtype=np.float64)
        for start in range(0, count, BLOCK):
            block = samples[start : start + BLOCK]
            self._block(len(block), block)
            block *= std
            block /= 2.0
        return samples


class Rehearsed:
    """A noise source whose first calls are known in advance (``plan``: their counts and deviations, in order):
    a thread of its own starts drawing them from ``source`` at once, so the draw overlaps whatever the caller does
    meanwhile (the worker: the rest of the contribution stream). Calls that follow the plan get what was drawn;
    the first call off the plan raises ``ValueError`` (nothing is served out of order); calls after the plan go
    to ``source``, which the plan has advanced exactly as direct calls would have. So the samples, and their
    order, are those of ``source`` called directly. Holds the plan's samples (8 bytes each) until they are used."""

    def __init__(self, source: NoiseSource, plan: Sequence[tuple[int, float]]) -> None:
        self._source = source
        self.plan = list(plan)
        self._drawn: list[np.ndarray | None] = []
        self._failure: BaseException | None = None
        self._served = 0
        self._thread = threading.Thread(target=self._draw, name="noise-ahead", daemon=True)
        self._thread.start()

    def _draw(self) -> None:
        try:
            for count, std in self.plan:
                self._drawn.append(self._source.gaussian(count, std))
        except BaseException as exc:  # handed to the caller's next call
            self._failure = exc

    def gaussian(self, count: int, std: float) -> np.ndarray:
        if self._served >= len(self.plan):
            return self._source.gaussian(count, std)
        if (count, std) != self.plan[self._served]:
            raise ValueError(f"noise asked for {(count, std)}, the rehearsed call is {self.plan[self._served]}")
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        drawn, self._drawn[self._served] = self._drawn[self._served], None  # freed as soon as it is used
        self._served += 1
        assert drawn is not None
        return drawn
