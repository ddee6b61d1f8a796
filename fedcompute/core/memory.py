"""glibc's allocator, set for processes that move MiB-sized buffers all day (upload chunks, envelopes, tensors).

By default glibc serves a large request (over 128 KiB at first) with a fresh ``mmap`` and unmaps it when freed, and
returns freed memory at the top of the heap to the kernel once more than 128 KiB of it is there. So every 4 MiB
envelope read, protobuf message built or serialized, and chunk received costs a thousand page faults, each page
zeroed again by the kernel: on the 2-core VM the benchmarks run on, building and serializing one 4.5 MB
``StreamContributionsResponse`` took 7.5 ms that way and 0.4 ms with the settings below (the server streams one per
contribution to the aggregator); copying a 4 MiB bytes object, 7.4 ms (2,017 page faults) against 0.44 ms (41). With
them, requests up to 32 MiB come from the heap and up to 64 MiB of free memory stays with the process for the next
buffer (bounded: the process's peak is unchanged, its idle size may stay up to that much higher). Measured (bench/):
upload of 4 MiB envelopes 0.36 -> 0.50 of the raw sink (213 -> 396 MB/s), a benchmark round of 100 devices ~5.0 ->
~4.2 s (medians of nine each, the two alternated). Every fedcompute process calls :func:`keep_large_buffers` at
start (the CLI and the aggregator worker); an operator's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
(read by glibc itself) win, and on other C libraries (musl, macOS) nothing is changed. It was switched off for a
while on suspicion of a flaky crash-safety test; that flake was a device-side bug (fixed), and the chaos test passes
with it on.

:func:`freeze_startup_heap` is the other half, for CPython's cyclic garbage collector. A server process holds some
450,000 objects once started (torch, protobuf descriptors, SQLAlchemy, gRPC); every full (oldest-generation)
collection walked all of them with the GIL held: 0.4-0.5 s each on the benchmark VM, about once a minute under a
steady check-in load, which stopped every RPC in flight (10 s windows of 64 callers on Postgres: p99 565 ms in the
window that held one, 163-186 ms in the others). Moved to the permanent generation once start-up is done, they are
never walked again: a full collection then took 0.7 ms instead of ~400 ms (`python -m bench.gc_pause`). Objects
made later are collected as before; the price is that a cycle of start-up objects that becomes garbage later is
never freed (start-up builds what the process keeps). Every long-running fedcompute process calls it once started
(`serve`, `up`, the aggregator worker), through :func:`hold_frozen`, which also freezes again after a lazy import:
modules imported once the process serves (a key service's accountants, torch with them, loaded in the background
once it holds a DP policy; the server's `torch.export` stack the first time it exports a built-in plan itself: 1,225
modules and ~158,000 objects) are as long-lived as start-up's, and left unfrozen they made every later full
collection walk them again (83 ms for 159,000 objects here). The same price applies to what is alive at that moment.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024
OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_large_buffers() -> bool:
    """Apply the thresholds above to this process's allocator; whether they were applied (False: not glibc, or
    the operator set their own)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in OPERATOR_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl names its C library differently)
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


REFREEZE_CHECK_S = 10.0  # how often a waiting process looks for modules imported since its last freeze
_modules_at_freeze = [0]
_frozen = [False]  # start-up's heap frozen once: read instead of gc.get_freeze_count(), which walks the whole heap
_recheck = [False]  # the last freeze followed imports: freeze once more at the next check (refreeze_after_imports)


def freeze_startup_heap() -> int:
    """Collect what start-up left as garbage, then move every object still alive into the permanent generation,
    which no collection walks again (see the module); how many objects are frozen in all."""
    gc.collect()
    gc.freeze()
    _modules_at_freeze[0] = len(sys.modules)
    _frozen[0] = True
    return gc.get_freeze_count()


def refreeze_after_imports() -> int:
    """Freeze again if modules were imported since the last freeze (see the module), and once more at the call
    after such a freeze: an import under way while it froze (its module already in ``sys.modules``, its body still
    running on another thread) made objects after it, which no later count of modules would show. How many objects
    are frozen in all then, or 0 if there was nothing to do (or nothing frozen yet: start-up is not over). A check
    that finds nothing to do costs no walk of the heap: ``gc.get_freeze_count()`` counts the frozen objects one by
    one, with the GIL held (33 ms for a server's 274,000 here), and every process checks every 10 s."""
    if not _frozen[0]:
        return 0
    imported = len(sys.modules) > _modules_at_freeze[0]
    if not imported and not _recheck[0]:
        return 0
    _recheck[0] = imported
    return freeze_startup_heap()


def hold_frozen(stop: threading.Event, check_s: float = REFREEZE_CHECK_S) -> None:
    """What a started process's main thread does until ``stop``: freeze start-up's heap, then every ``check_s``
    freeze again after lazy imports."""
    freeze_startup_heap()
    while not stop.wait(check_s):
        refreeze_after_imports()
