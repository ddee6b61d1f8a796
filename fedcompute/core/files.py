"""Naming a file durably: a rename (or link) is a change to its directory, which an fsync of the file does not
write. Until the directory is fsynced too, a power cut can lose the new name, and with it the file, even though
its bytes were on disk and the caller was told they were stored (ext4 usually commits the name with the next
fsync of anything on the disk; other file systems, and POSIX, promise nothing of the kind)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import tempfile
import threading
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Write ``directory``'s entries (names added, replaced or removed in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached(fd: int) -> None:
    """Let the kernel drop the page cache's copy of an open file whose bytes were fsynced and will not be read
    again soon (an upload: written once here, read once by the aggregator). A hint: nothing is lost or changed,
    and where the call does not exist (macOS) or is refused nothing happens. Kept, such pages push out what is
    read again (models, plans, the database's files), and each new file's writes take pages the kernel must find
    and clear; dropped, the next writes reuse them (bench/upload.py)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):  # a refused hint is no reason to fail a write
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


_ALIGN = 4096  # a multiple of every disk's logical block size: what direct I/O asks buffers and lengths to be
_buffers = threading.local()  # each reading thread's page-aligned buffer, kept for its next file


def read_uncached(path: Path) -> bytes:
    """The file's bytes, read past the page cache where the file system allows it (``O_DIRECT`` into a
    page-aligned buffer kept per thread, then copied out once), else read as usual. For a file read once and not
    cached (an upload, dropped from the cache when it was stored, streamed to the aggregator): the kernel then
    neither finds nor clears pages for it, ~1.5 -> ~0.3 ms of system time per 4 MiB here. A file that is cached
    is read from the disk again, so this is not for files read often."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return path.read_bytes()
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # FileNotFoundError and the like are the caller's
            raise
        return path.read_bytes()  # a file system without direct I/O
    try:
        size = os.fstat(fd).st_size
        with memoryview(_buffer(-(-max(size, 1) // _ALIGN) * _ALIGN)) as view:  # released: the buffer may grow
            got = 0
            while got < size:
                read = os.readv(fd, [view[got:]])
                if read == 0:
                    break
                got += read
            return bytes(view[: min(got, size)])
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return path.read_bytes()  # an alignment the device refuses
    finally:
        os.close(fd)


def _buffer(capacity: int) -> mmap.mmap:
    buffer: mmap.mmap | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < capacity:
        if buffer is not None:
            buffer.close()
        buffer = _buffers.buffer = mmap.mmap(-1, capacity)
    return buffer


def replace_durably(source: Path | str, target: Path) -> None:
    """``os.replace(source, target)``, then the target's directory fsynced: once this returns, ``target`` names
    the new file after a power cut too (``source``'s bytes must have been fsynced before)."""
    os.replace(source, target)
    fsync_directory(target.parent)


def create_once(path: Path, data: bytes) -> bytes:
    """Make ``path`` hold ``data`` unless it exists, and return what it holds: the first writer's bytes whichever
    process wins a race. The bytes go to a temporary file (mode 0600) that is fsynced, then linked to ``path``
    (atomic, and it fails if the name exists), then the directory fsynced: a power cut or a kill leaves the file
    whole or absent, never half-written, and never forgets a name once this returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            data = path.read_bytes()
    finally:
        os.unlink(tmp)
    fsync_directory(path.parent)
    return data
