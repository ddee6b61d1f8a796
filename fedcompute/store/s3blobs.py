"""Content-addressed blobs in an S3-compatible bucket: ``PREFIX/sha256/ab/cdef...``, verified on every read.

An object is named by the sha256 of its bytes and its bytes never change, so a put of an address already present
uploads nothing (the object is copied onto itself, server side, which sets its LastModified to now, as the local
store sets a file's mtime: the orphan sweep goes by that time), and a PUT is atomic (the object appears whole or
not at all), so no temp-and-rename is needed. No read trusts the bucket: ``get`` hashes what it returns, and
``read_chunks`` downloads the whole object once into a local spool (memory, or an unnamed file in the staging
directory past ``SPOOL_BYTES``), hashing as it goes, and serves the chunks from that spool only once the hash
matched: the bytes served are the bytes verified, at the cost of one full GET per read (the local store likewise
hashes the whole file before each read).

Failures to reach the store (after boto3's own retries) raise ``Unavailable``, which callers see as UNAVAILABLE
and loops retry; the cause goes to the log.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

import structlog
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

from fedcompute.core.blobs import SHA256_HEX, BlobCorrupted, BlobMissing, address_parts
from fedcompute.core.errors import Unavailable

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger("fedcompute.blobs")
_READ = 1024 * 1024
SPOOL_BYTES = 8 * 1024 * 1024
_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})
_TRANSIENT = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "500", "503"})
_TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)


class S3BlobStore:
    def __init__(self, client: S3Client, bucket: str, prefix: str, staging: Path) -> None:
        self._s3 = client
        self._bucket = bucket
        self._root = f"{prefix.strip('/')}/sha256/" if prefix.strip("/") else "sha256/"
        self._staging = staging
        staging.mkdir(parents=True, exist_ok=True)

    def staging_dir(self) -> Path:
        """A local directory for uploads in progress, later moved into the bucket with ``put_file``."""
        return self._staging

    def key(self, sha256_hex: str) -> str:
        """The object key of an address."""
        head, rest = address_parts(sha256_hex)
        return f"{self._root}{head}/{rest}"

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        key = self.key(digest)
        with _reaching("put"):
            if not self._refreshed(key):
                self._s3.put_object(Bucket=self._bucket, Key=key, Body=data)
        return digest

    def put_file(self, path: Path, sha256_hex: str | None = None, *, synced: bool = False) -> str:
        digest = sha256_hex or _hash_file(path)  # the caller's digest, when it hashed the bytes as they arrived
        key = self.key(digest)
        with _reaching("put_file"):
            if not self._refreshed(key):
                self._s3.upload_file(str(path), self._bucket, key, Config=_TRANSFER)
        path.unlink()  # only once the object is in place: a failed upload leaves the staged file to retry
        return digest

    def get(self, sha256_hex: str, *, verify: bool = True, once: bool = False) -> bytes:
        key = self.key(sha256_hex)
        with _reaching("get"):
            data = self._body(key, sha256_hex).read()
        if verify and hashlib.sha256(data).hexdigest() != sha256_hex:
            raise BlobCorrupted(f"blob {sha256_hex} is corrupted in the bucket")
        return data

    def read_chunks(self, sha256_hex: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        key = self.key(sha256_hex)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, mode="w+b", dir=str(self._staging))  # noqa: SIM115
        try:
            digest = hashlib.sha256()
            with _reaching("read_chunks"):
                for chunk in self._body(key, sha256_hex).iter_chunks(_READ):
                    digest.update(chunk)
                    spool.write(chunk)
            if digest.hexdigest() != sha256_hex:
                raise BlobCorrupted(f"blob {sha256_hex} is corrupted in the bucket")
            spool.seek(offset)
        except BaseException:
            spool.close()
            raise
        return _chunks(spool, chunk_size)

    def size(self, sha256_hex: str) -> int:
        key = self.key(sha256_hex)
        with _reaching("size"):
            found = self._head(key)
        if found is None:
            raise BlobMissing(f"no blob {sha256_hex}")
        return found

    def exists(self, sha256_hex: str) -> bool:
        key = self.key(sha256_hex)
        with _reaching("exists"):
            return self._head(key) is not None

    def delete(self, sha256_hex: str) -> None:
        key = self.key(sha256_hex)
        with _reaching("delete"):
            self._s3.delete_object(Bucket=self._bucket, Key=key)  # S3 deletes are idempotent

    def stored_before(self, cutoff: datetime) -> list[str]:
        found = []
        limit = cutoff.timestamp()
        with _reaching("stored_before"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=self._root)
            for page in pages:
                for item in page.get("Contents", []):
                    address = item["Key"].removeprefix(self._root).replace("/", "")
                    if SHA256_HEX.match(address) and item["LastModified"].timestamp() < limit:
                        found.append(address)
        return found

    def _refreshed(self, key: str) -> bool:
        """The object is already stored: copied onto itself (server side, its bytes unchanged) so that its
        LastModified is now, as the local store sets the file's mtime (``store.blobs``: the orphan sweep must not
        take it for an old orphan while the row about to refer to it commits). False if there is none (the copy's
        source is missing): the caller puts it. One request, where a HEAD first would be two."""
        try:
            self._s3.copy_object(
                Bucket=self._bucket, Key=key, CopySource={"Bucket": self._bucket, "Key": key},
                MetadataDirective="REPLACE",
            )  # fmt: skip
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise
        return True

    def _head(self, key: str) -> int | None:
        """The object's size, or None if there is none."""
        try:
            return self._s3.head_object(Bucket=self._bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise

    def _body(self, key: str, sha256_hex: str) -> StreamingBody:
        try:
            return self._s3.get_object(Bucket=self._bucket, Key=key)["Body"]
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise BlobMissing(f"no blob {sha256_hex}") from None
            raise


@contextmanager
def _reaching(operation: str) -> Iterator[None]:
    """Turn "the store cannot be reached or is overloaded" into ``Unavailable``; everything else passes."""
    try:
        yield
    except (BotoConnectionError, HTTPClientError, IncompleteReadError, ClientError, S3UploadFailedError) as exc:
        if not _transient(exc):
            raise  # a refusal (access denied, no such bucket): an internal error, logged with its traceback
        log.warning("blob_store_unreachable", operation=operation, error=str(exc))
        raise Unavailable("the blob store cannot be reached or is failing; retry later") from exc


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, S3UploadFailedError):  # boto3's upload_file wraps the ClientError of a failed part
        return exc.__context__ is not None and _transient(exc.__context__)
    if isinstance(exc, ClientError):
        return _code(exc) in _TRANSIENT
    return isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _chunks(spool: IO[bytes], chunk_size: int) -> Iterator[bytes]:
    with spool:
        while chunk := spool.read(chunk_size):
            yield chunk


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ):
            digest.update(chunk)
    return digest.hexdigest()
