"""The allocator setting of every fedcompute process (core/memory.py), observed through glibc's own accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# a fresh interpreter: allocates a 4 MiB buffer and reports where glibc put it (mallinfo2: hblkhd = bytes in
# mmapped chunks), after applying the setting or not
_PROBE = """
import ctypes, json, sys
from fedcompute.core.memory import keep_large_buffers
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = keep_large_buffers() if sys.argv[1] == "apply" else None
before = libc.mallinfo2().hblkhd
buffer = bytearray(4 * 1024 * 1024)
during = libc.mallinfo2().hblkhd
del buffer
print(json.dumps({"applied": applied, "mmapped": during - before}))
"""

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)


def _probe(mode: str, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    answer: dict[str, object] = json.loads(out.stdout)
    return answer


@glibc
def test_a_large_buffer_comes_from_the_heap_once_applied_and_from_mmap_without() -> None:
    assert _probe("leave") == {"applied": None, "mmapped": pytest.approx(4 * 1024 * 1024, rel=0.01)}
    assert _probe("apply") == {"applied": True, "mmapped": 0}


@glibc
def test_an_operators_own_malloc_settings_win() -> None:
    small = _probe("apply", MALLOC_MMAP_THRESHOLD_=str(1024 * 1024))
    assert small["applied"] is False  # nothing changed by us: glibc's threshold is the operator's 1 MiB
    assert small["mmapped"] == pytest.approx(4 * 1024 * 1024, rel=0.01)
