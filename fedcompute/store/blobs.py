"""Local content-addressed blob directory: ``sha256/ab/cdef...``, written temp -> fsync -> rename -> fsync of the
directory. A put of bytes already stored writes nothing and sets their stored time (mtime) to now."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from fedcompute.core.blobs import BlobCorrupted, BlobMissing, blob_path
from fedcompute.core.files import fsync_directory, read_uncached, replace_durably

_READ = 1024 * 1024
PUT_PREFIX = "put-"  # a blob being written in the staging directory; one a crash left is the staging sweep's


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self._root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def staging_dir(self) -> Path:
        """A directory on the same filesystem, for files later moved in with ``put_file``."""
        return self._root / "tmp"

    def _path(self, sha256_hex: str) -> Path:
        return blob_path(self._root, sha256_hex)

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self._path(digest)
        if _refreshed(target):
            return digest
        fd, tmp = tempfile.mkstemp(dir=self.staging_dir(), prefix=PUT_PREFIX)  # a crash leaves it to the sweep
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self._install(Path(tmp), target)
        return digest

    def put_file(self, path: Path, sha256_hex: str | None = None, *, synced: bool = False) -> str:
        """Move ``path`` in; ``sha256_hex``, when the caller hashed the bytes as they arrived, saves a second pass
        (every read verifies the address anyway). ``synced``: the caller fsynced the file after its last write, so
        it is not fsynced again: on ext4 that fsync found nothing to write and still flushed the disk's cache,
        one flush of the ~5 each upload made (strace, a 100-device benchmark round)."""
        digest = sha256_hex or _hash_file(path)
        target = self._path(digest)
        if _refreshed(target):
            path.unlink()
            return digest
        if not synced:
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        self._install(path, target)
        return digest

    def _install(self, tmp: Path, target: Path) -> None:
        """Name the (fsynced) file durably: a blob counted in a committed transaction survives a power cut."""
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            fsync_directory(target.parent.parent)  # the new ``ab/`` directory's own name
        replace_durably(tmp, target)

    def get(self, sha256_hex: str, *, verify: bool = True, once: bool = False) -> bytes:
        path = self._path(sha256_hex)
        try:
            data = read_uncached(path) if once else path.read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"no blob {sha256_hex}") from None
        if verify and hashlib.sha256(data).hexdigest() != sha256_hex:
            raise BlobCorrupted(f"blob {sha256_hex} is corrupted on disk")
        return data

    def read_chunks(self, sha256_hex: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        path = self._path(sha256_hex)
        if not path.exists():
            raise BlobMissing(f"no blob {sha256_hex}")
        if _hash_file(path) != sha256_hex:
            raise BlobCorrupted(f"blob {sha256_hex} is corrupted on disk")
        return _chunks(path, offset, chunk_size)

    def size(self, sha256_hex: str) -> int:
        try:
            return self._path(sha256_hex).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(f"no blob {sha256_hex}") from None

    def exists(self, sha256_hex: str) -> bool:
        return self._path(sha256_hex).exists()

    def delete(self, sha256_hex: str) -> None:
        self._path(sha256_hex).unlink(missing_ok=True)

    def stored_before(self, cutoff: datetime) -> list[str]:
        found = []
        limit = cutoff.timestamp()
        for path in (self._root / "sha256").glob("??/*"):
            try:
                if path.stat().st_mtime < limit:
                    found.append(path.parent.name + path.name)
            except FileNotFoundError:
                continue  # deleted meanwhile
        return found


def _refreshed(target: Path) -> bool:
    """The blob is already stored: its stored time (mtime) set to now, so that the orphan sweep, which deletes
    blobs no row refers to once they are older than its grace period, does not take it for an old orphan while
    the row about to refer to it again commits (an update identical to one a crash left unreferenced, say).
    False if there is none (or it was just swept): the caller writes it."""
    try:
        os.utime(target)
    except FileNotFoundError:
        return False
    return True


def _chunks(path: Path, offset: int, chunk_size: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(chunk_size):
            yield chunk


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ):
            digest.update(chunk)
    return digest.hexdigest()
