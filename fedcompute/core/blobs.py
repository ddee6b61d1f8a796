"""The blob store seam: content-addressed, immutable bytes, verified on every read (one reader excepted: the job
stream, whose receiver, the attested aggregator, hashes every envelope against the job's input set itself)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Protocol


class BlobStore(Protocol):
    def put(self, data: bytes) -> str:
        """Store ``data``; return its sha256 hex (its address)."""
        ...

    def put_file(self, path: Path, sha256_hex: str | None = None, *, synced: bool = False) -> str:
        """Move a finished file into the store (hashing it unless the caller gives its digest, hashed as the bytes
        arrived); return its sha256 hex. Reads verify the address whatever was given. ``synced``: the caller
        fsynced the file after its last write (a store on this disk then does not fsync it again)."""
        ...

    def get(self, sha256_hex: str, *, verify: bool = True, once: bool = False) -> bytes:
        """Return the bytes, raising ``BlobCorrupted`` if they no longer hash to their address (``BlobMissing`` if
        gone). ``verify=False`` skips the hash, for a reader that checks every byte against the address itself;
        ``once``: this blob is read this once and is not cached (an upload streamed to the aggregator), so a store
        may read it past its cache."""
        ...

    def read_chunks(self, sha256_hex: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        """Verify the blob, then yield it from ``offset`` in chunks."""
        ...

    def size(self, sha256_hex: str) -> int: ...

    def exists(self, sha256_hex: str) -> bool: ...

    def delete(self, sha256_hex: str) -> None:
        """Remove the blob (no error if it is already gone)."""
        ...

    def stored_before(self, cutoff: datetime) -> list[str]:
        """Addresses of blobs written before ``cutoff`` (for the orphan sweep)."""
        ...


class BlobCorrupted(Exception):
    """Stored bytes no longer match their sha256 address."""


class BlobMissing(Exception):
    """No blob has this address."""


SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # a blob's address


def address_parts(sha256_hex: str) -> tuple[str, str]:
    """A blob address split as every store files it (``ab``, ``cdef...``); ``BlobMissing`` for anything but 64
    lowercase hex digits: an address from elsewhere never names a path or key outside the store."""
    if not SHA256_HEX.match(sha256_hex):
        raise BlobMissing(f"{sha256_hex!r} is not a sha256 address")
    return sha256_hex[:2], sha256_hex[2:]


def blob_path(root: Path, sha256_hex: str) -> Path:
    """Where a local blob directory ``root`` keeps the blob of this sha256: ``sha256/ab/cdef...``."""
    return root.joinpath("sha256", *address_parts(sha256_hex))
