"""Naming a file durably: a rename (or link) is a change to its directory, which an fsync of the file does not
write. Until the directory is fsynced too, a power cut can lose the new name, and with it the file, even though
its bytes were on disk and the caller was told they were stored (ext4 usually commits the name with the next
fsync of anything on the disk; other file systems, and POSIX, promise nothing of the kind).

And files written or read once (uploads): past the page cache, where the file system allows it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
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


def lock_current(path: Path, flags: int, blocking: bool = True) -> int | None:
    """``path`` opened (``flags``, created 0600 if missing) under an exclusive ``flock``, if the file locked is still
    the one the path names; None (nothing left open) if it was removed or replaced while this waited for the lock:
    open it again. With ``blocking`` False a lock held elsewhere raises ``BlockingIOError`` (nothing left open)."""
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        held, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
        return fd
    os.close(fd)
    return None


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


class NotReadable(OSError):
    """A file a bounded read (``read_uncached`` with ``max_bytes``) refuses: not a regular file, or too large."""


def read_uncached(path: Path, max_bytes: int | None = None) -> bytes:
    """The file's bytes, read past the page cache where the file system allows it (``O_DIRECT`` into a
    page-aligned buffer kept per thread, then copied out once), else read as usual. For a file read once and not
    cached (an upload, dropped from the cache when it was stored, read once by the aggregator): the kernel then
    neither finds nor clears pages for it, ~1.5 -> ~0.3 ms of system time per 4 MiB here. A file that is cached
    is read from the disk again, so this is not for files read often. With ``max_bytes`` (a file in a directory
    someone else controls): only a regular file of at most that many bytes, opened without following a link or
    waiting on a FIFO's writer; ``NotReadable`` for anything else."""
    guard = os.O_NOFOLLOW | os.O_NONBLOCK if max_bytes is not None else 0
    flag = getattr(os, "O_DIRECT", 0)
    fd = -1
    if flag:
        try:
            fd = os.open(path, os.O_RDONLY | flag | guard)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # FileNotFoundError and the like are the caller's
                raise
    if fd < 0:  # no direct I/O here
        fd = os.open(path, os.O_RDONLY | guard)
        flag = 0
    try:
        size = _size(fd, path, max_bytes)
        if not flag:
            return _read_plain(fd, size)
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
        os.lseek(fd, 0, os.SEEK_SET)
        _without_direct(fd)
        return _read_plain(fd, size)  # an alignment the device refuses
    finally:
        os.close(fd)


def bounded_refusal(found: os.stat_result, max_bytes: int) -> str:
    """Why a bounded read (``read_uncached`` with ``max_bytes``) refuses a file of this status ('' if it reads it):
    one test for whoever looks before reading and for the read itself."""
    if not stat.S_ISREG(found.st_mode):
        return "is not a regular file"
    if found.st_size > max_bytes:
        return f"holds {found.st_size} bytes, more than {max_bytes}"
    return ""


def _size(fd: int, path: Path, max_bytes: int | None) -> int:
    found = os.fstat(fd)
    if max_bytes is not None and (refused := bounded_refusal(found, max_bytes)):
        raise NotReadable(f"{path} {refused}")
    return found.st_size


def _without_direct(fd: int) -> None:
    """Plain I/O on ``fd`` from now on: the device refused a direct transfer's alignment."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))


def _read_plain(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from ``fd``'s position (fewer if the file is shorter by now)."""
    parts, got = [], 0
    while got < size and (part := os.read(fd, size - got)):
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _buffer(capacity: int) -> mmap.mmap:
    buffer: mmap.mmap | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < capacity:
        if buffer is not None:
            buffer.close()
        buffer = _buffers.buffer = _aligned(capacity)
    return buffer


class UncachedAppender:
    """Appends to a file past the page cache where the file system allows (``O_DIRECT``): the bytes are copied into
    a page-aligned buffer and written a whole buffer at a time; ``sync`` writes the last partial block padded with
    zeros, cuts the file back to its length and fsyncs. The kernel then neither finds nor clears pages for the
    file, nor writes them back, nor drops them (bench/upload.py). Where direct I/O is refused (``EINVAL``, at the
    open or at a write), plain writes, then fsync and ``drop_cached``. Opened at ``offset``, the file is created if
    missing and cut to that length (bytes past it are dropped). Bytes written are on disk only once ``sync``
    returns: ``close`` alone may lose the last buffer's worth. One thread at a time."""

    def __init__(self, path: Path, offset: int) -> None:
        self._fd, self._buffer = -1, _take_buffer() if hasattr(os, "O_DIRECT") else None
        try:
            if self._buffer is not None:
                with contextlib.suppress(OSError):  # EINVAL: no direct I/O here; anything else again just below
                    self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
            if self._fd < 0:
                self._release_buffer()
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.ftruncate(self._fd, offset)
            self._base = offset if self._buffer is None else offset - offset % _ALIGN  # the buffer's file offset
            self._fill = offset - self._base  # bytes held in the buffer
            if self._fill and self._buffer is not None:  # resumed inside a block: the buffer starts with its head
                with open(path, "rb") as head, memoryview(self._buffer) as buffer:
                    head.seek(self._base)
                    head.readinto(buffer[: self._fill])
        except BaseException:
            self.close()
            raise

    def write(self, data: bytes | memoryview) -> None:
        with memoryview(data) as source:
            taken = 0
            while self._buffer is not None and taken < len(source):
                n = min(len(source) - taken, len(self._buffer) - self._fill)
                self._buffer[self._fill : self._fill + n] = source[taken : taken + n]
                self._fill += n
                taken += n
                if self._fill == len(self._buffer) and self._written_direct(self._fill):
                    self._base += self._fill
                    self._fill = 0
            if taken < len(source):
                self._write_plain(source[taken:])

    def sync(self) -> None:
        """Every byte written so far on disk, the file exactly that long, whatever the file system."""
        if self._buffer is not None and self._fill:
            whole = -(-self._fill // _ALIGN) * _ALIGN
            self._buffer[self._fill : whole] = bytes(whole - self._fill)
            if self._written_direct(whole):
                os.ftruncate(self._fd, self._base + self._fill)
        os.fsync(self._fd)
        if self._buffer is None:
            drop_cached(self._fd)

    def close(self) -> None:
        self._release_buffer()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> UncachedAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _written_direct(self, length: int) -> bool:
        """The buffer's first ``length`` bytes (whole blocks) written at ``_base``; False if direct I/O was refused
        (an alignment the device does not take): then the buffer's bytes went plainly and plain writes go on."""
        assert self._buffer is not None
        try:
            with memoryview(self._buffer) as buffer:
                write_all(self._fd, buffer[:length], self._base)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        _without_direct(self._fd)
        filled, self._fill = self._fill, 0
        with memoryview(self._buffer) as buffer, buffer[:filled] as held:
            self._write_plain(held)
        self._release_buffer()
        return False

    def _write_plain(self, data: memoryview) -> None:
        write_all(self._fd, data, self._base)
        self._base += len(data)

    def _release_buffer(self) -> None:
        if self._buffer is not None:
            _give_buffer(self._buffer)
            self._buffer = None


def write_all(fd: int, data: memoryview, at: int) -> None:
    """All of ``data`` to ``fd`` at offset ``at`` (a write may take less than it was given)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], at + done)


_BUFFER_BYTES = 1 << 20  # one upload chunk: a write to the disk per chunk
_free: list[mmap.mmap] = []  # appenders' buffers, kept for the next (at most _FREE_KEPT)
_FREE_KEPT = 16
_free_lock = threading.Lock()


def _aligned(capacity: int) -> mmap.mmap:
    """Page-aligned memory of this process's own: private, so a forked child writes to its own copy (``mmap``'s
    anonymous default is a mapping shared with every child)."""
    return mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _take_buffer() -> mmap.mmap:
    with _free_lock:
        if _free:
            return _free.pop()
    return _aligned(_BUFFER_BYTES)


def _give_buffer(buffer: mmap.mmap) -> None:
    """Kept for the next appender, or dropped (unmapped once no view of it is left: not closed here, since a view
    an error's traceback still holds would make closing fail)."""
    with _free_lock:
        if len(_free) < _FREE_KEPT:
            _free.append(buffer)


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
