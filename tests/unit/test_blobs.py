"""One contract suite for the blob store, run against the local directory and an S3 bucket alike.

The S3 side is real S3 over HTTP: moto's server mode on 127.0.0.1 (port 0), started once per run, one bucket,
a fresh prefix per test. Tampering goes around the store (the file on disk, or a raw PUT of the object).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from fedcompute.core import files
from fedcompute.core.blobs import BlobCorrupted, BlobMissing
from fedcompute.core.errors import Unavailable
from fedcompute.core.settings import SettingError, Settings
from fedcompute.server.app import open_storage
from fedcompute.store.blobs import LocalBlobStore
from fedcompute.store.blobstores import StagedBlobStore, open_blob_store, s3_client
from fedcompute.store.s3blobs import SPOOL_BYTES, S3BlobStore
from tests.pagecache import kept_in_memory, pages_cached

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BUCKET = "fedcompute-test"
PAST = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE = datetime(2100, 1, 1, tzinfo=UTC)


@dataclass
class Subject:
    """A store under test, plus raw access around it: read or overwrite what is stored at an address."""

    store: StagedBlobStore
    raw: Callable[[str], bytes]
    overwrite: Callable[[str, bytes], None]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[tuple[str, S3Client]]:
    """moto's S3 on a free port, with the test bucket, and a client built the way the server builds its own."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = s3_client(_s3_settings(Path("unused"), endpoint, ""))
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


@pytest.fixture
def s3_endpoint(s3_server: tuple[str, S3Client]) -> str:
    return s3_server[0]


def _s3_settings(workdir: Path, endpoint: str, url: str) -> Settings:
    return Settings(
        workdir=workdir,
        blob_store_url=url,
        s3_endpoint_url=endpoint,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )


def _local(tmp_path: Path) -> Subject:
    store = LocalBlobStore(tmp_path / "blobs")

    def path(sha: str) -> Path:
        return tmp_path / "blobs" / "sha256" / sha[:2] / sha[2:]

    def overwrite(sha: str, data: bytes) -> None:
        path(sha).write_bytes(data)

    return Subject(store, lambda sha: path(sha).read_bytes(), overwrite)


def _s3(tmp_path: Path, raw: S3Client) -> Subject:
    prefix = f"run-{secrets.token_hex(6)}/blobs"  # a fresh prefix: each test sees an empty store
    store = S3BlobStore(raw, BUCKET, prefix, tmp_path / "blobs" / "tmp")

    def key(sha: str) -> str:
        return f"{prefix}/sha256/{sha[:2]}/{sha[2:]}"

    def overwrite(sha: str, data: bytes) -> None:
        raw.put_object(Bucket=BUCKET, Key=key(sha), Body=data)

    return Subject(store, lambda sha: raw.get_object(Bucket=BUCKET, Key=key(sha))["Body"].read(), overwrite)


@pytest.fixture(params=["local", "s3"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    if request.param == "local":
        return _local(tmp_path)
    return _s3(tmp_path, request.getfixturevalue("s3_server")[1])


def test_round_trip_at_the_content_address(subject: Subject) -> None:
    store = subject.store
    sha = store.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert subject.raw(sha) == b"hello"  # stored at .../sha256/ab/cdef...
    assert store.get(sha) == b"hello"
    assert store.exists(sha)
    assert store.size(sha) == 5
    assert not list(store.staging_dir().iterdir())


def test_put_is_idempotent(subject: Subject) -> None:
    sha = subject.store.put(b"same bytes")
    assert subject.store.put(b"same bytes") == sha
    assert subject.store.get(sha) == b"same bytes"
    assert subject.store.stored_before(FUTURE) == [sha]


def test_put_file_moves_the_staged_file_in(subject: Subject) -> None:
    store = subject.store
    staged = store.staging_dir() / "upload-1"
    staged.write_bytes(b"data")
    sha = store.put_file(staged)
    assert not staged.exists()
    assert store.get(sha) == b"data"
    again = store.staging_dir() / "upload-2"
    again.write_bytes(b"data")
    assert store.put_file(again) == sha  # already present: the staged copy is dropped all the same
    assert not again.exists()


def test_missing_blob(subject: Subject) -> None:
    store = subject.store
    absent = "0" * 64
    with pytest.raises(BlobMissing):
        store.get(absent)
    with pytest.raises(BlobMissing):
        store.read_chunks(absent, 0, 4)
    with pytest.raises(BlobMissing):
        store.size(absent)
    assert not store.exists(absent)
    store.delete(absent)  # no error


@pytest.mark.parametrize("address", ["../../etc/passwd", "A" * 64, "0" * 63, ""])
def test_bad_address_is_missing(subject: Subject, address: str) -> None:
    with pytest.raises(BlobMissing):
        subject.store.get(address)
    with pytest.raises(BlobMissing):
        subject.store.read_chunks(address, 0, 4)


def test_tampered_blob_is_refused_on_every_read(subject: Subject) -> None:
    sha = subject.store.put(b"original")
    subject.overwrite(sha, b"tampered")
    with pytest.raises(BlobCorrupted):
        subject.store.get(sha)
    with pytest.raises(BlobCorrupted):
        subject.store.read_chunks(sha, 0, 4)  # before the first chunk is handed out
    subject.overwrite(sha, b"original")
    assert subject.store.get(sha) == b"original"


def test_an_unverified_read_returns_the_stored_bytes_as_they_are(subject: Subject) -> None:
    """``get(verify=False)`` (the job stream's, whose receiver hashes every envelope itself) hands out what is
    stored, altered or not, and still says when nothing is there; a verified read of the same blob refuses it."""
    sha = subject.store.put(b"original")
    subject.overwrite(sha, b"tampered")
    assert subject.store.get(sha, verify=False) == b"tampered"
    with pytest.raises(BlobCorrupted):
        subject.store.get(sha)
    subject.store.delete(sha)
    with pytest.raises(BlobMissing):
        subject.store.get(sha, verify=False)


def test_a_read_once_returns_the_stored_bytes_as_a_verified_read_does(subject: Subject) -> None:
    """``get(once=True)`` (the job stream's: an upload read this once) is a hint to read past a cache; the bytes
    are the same, whatever the size against the disk's blocks, and a missing or tampered blob is reported alike."""
    for size in (0, 1, 4095, 4096, 4097, 3 * 1024 * 1024 + 5):
        data = os.urandom(size)
        sha = subject.store.put(data)
        assert subject.store.get(sha, once=True) == data
        assert subject.store.get(sha, verify=False, once=True) == data
    subject.overwrite(sha, b"tampered")
    with pytest.raises(BlobCorrupted):
        subject.store.get(sha, once=True)
    subject.store.delete(sha)
    with pytest.raises(BlobMissing):
        subject.store.get(sha, verify=False, once=True)


@pytest.mark.skipif(sys.platform != "linux", reason="O_DIRECT and mincore are Linux's")
def test_a_local_read_once_leaves_the_page_cache_as_it_found_it(tmp_path: Path) -> None:
    """A local blob read once goes past the page cache (``O_DIRECT``, core/files.py ``read_uncached``): an
    upload dropped from the cache when stored is not brought back into it by the aggregator's stream, where the
    kernel would find and clear pages for it; a plain read brings it back (the test can tell the two apart)."""
    if kept_in_memory(tmp_path):
        pytest.skip("the test directory is on tmpfs: its files live in the page cache")
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(2 * 1024 * 1024)
    staged = store.staging_dir() / "upload"
    with staged.open("wb") as handle:  # as an upload is stored: fsynced, then dropped from the cache
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        files.drop_cached(handle.fileno())
    sha = store.put_file(staged, hashlib.sha256(data).hexdigest())  # hashed as it arrived, as an upload is
    path = tmp_path / "blobs" / "sha256" / sha[:2] / sha[2:]
    assert pages_cached(path)[0] == 0
    assert store.get(sha, verify=False, once=True) == data
    cached, pages = pages_cached(path)
    assert cached == 0, f"{cached} of {pages} pages came back into the cache"
    assert store.get(sha, verify=False) == data
    assert pages_cached(path)[0] == pages  # a plain read caches what it reads


def test_a_read_once_falls_back_to_a_plain_read_where_direct_io_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the platform has no ``O_DIRECT`` (macOS) or the file system refuses it (EINVAL), the bytes come from
    a plain read; other errors (a missing file) are not hidden."""
    path = tmp_path / "blob"
    data = os.urandom(10_000)
    path.write_bytes(data)
    real_open = os.open

    def refusing(name: str | Path, flags: int, *args: int) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "direct I/O refused")
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    assert files.read_uncached(path) == data
    monkeypatch.undo()
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    assert files.read_uncached(path) == data
    with pytest.raises(FileNotFoundError):
        files.read_uncached(tmp_path / "absent")


def test_read_chunks_from_an_offset(subject: Subject) -> None:
    sha = subject.store.put(b"0123456789")
    assert list(subject.store.read_chunks(sha, 3, 4)) == [b"3456", b"789"]
    assert list(subject.store.read_chunks(sha, 0, 5)) == [b"01234", b"56789"]
    assert list(subject.store.read_chunks(sha, 10, 4)) == []
    assert list(subject.store.read_chunks(sha, 99, 4)) == []


def test_large_blob_streams_in_chunks(subject: Subject) -> None:
    data = secrets.token_bytes(SPOOL_BYTES + 12345)  # past the S3 store's in-memory spool
    staged = subject.store.staging_dir() / "upload-big"
    staged.write_bytes(data)
    sha = subject.store.put_file(staged)
    assert subject.store.size(sha) == len(data)
    chunks = list(subject.store.read_chunks(sha, 1000, 1 << 20))
    assert max(len(c) for c in chunks) == 1 << 20
    assert b"".join(chunks) == data[1000:]


def test_delete_and_stored_before(subject: Subject) -> None:
    store = subject.store
    first, second = store.put(b"first"), store.put(b"second")
    assert sorted(store.stored_before(FUTURE)) == sorted([first, second])
    assert store.stored_before(PAST) == []
    store.delete(first)
    store.delete(first)  # already gone: no error
    assert not store.exists(first)
    with pytest.raises(BlobMissing):
        store.get(first)
    assert store.stored_before(FUTURE) == [second]


def test_storing_stored_bytes_again_makes_them_new(subject: Subject) -> None:
    """The orphan sweep deletes unreferenced blobs stored before its cutoff: bytes stored again (their row about to
    commit) must not be among them, though nothing is written again. The stored time is the local file's mtime
    (the kernel's coarse clock) or the object's LastModified (S3 keeps it to the second): a second apart."""
    store = subject.store
    by_put, by_file = b"put twice " + secrets.token_bytes(16), b"put_file twice " + secrets.token_bytes(16)
    first, second = store.put(by_put), store.put(by_file)
    time.sleep(1.1)
    cutoff = datetime.now(UTC)
    assert sorted(store.stored_before(cutoff)) == sorted([first, second])
    time.sleep(1.1)
    assert store.put(by_put) == first
    staged = store.staging_dir() / "again"
    staged.write_bytes(by_file)
    assert store.put_file(staged, second) == second
    assert not staged.exists()
    assert store.stored_before(cutoff) == []
    assert (store.get(first), store.get(second)) == (by_put, by_file)


# --- choosing the store from settings -------------------------------------------------------------------------


def test_empty_url_keeps_blobs_in_workdir(tmp_path: Path) -> None:
    store = open_blob_store(Settings(workdir=tmp_path))
    assert isinstance(store, LocalBlobStore)
    assert store.staging_dir() == tmp_path / "server" / "blobs" / "tmp"


def test_s3_url_selects_the_bucket_and_prefix(tmp_path: Path, s3_endpoint: str) -> None:
    settings = _s3_settings(tmp_path, s3_endpoint, f"s3://{BUCKET}/deploy/a/")
    db, store = open_storage(settings)
    db.dispose()
    assert isinstance(store, S3BlobStore)
    sha = store.put(b"where")
    assert store.key(sha) == f"deploy/a/sha256/{sha[:2]}/{sha[2:]}"
    assert s3_client(settings).head_object(Bucket=BUCKET, Key=store.key(sha))["ContentLength"] == 5
    assert store.staging_dir() == tmp_path / "server" / "blobs" / "tmp"


def test_missing_bucket_fails_at_start_naming_the_setting(tmp_path: Path, s3_endpoint: str) -> None:
    settings = _s3_settings(tmp_path, s3_endpoint, "s3://no-such-bucket/x")
    with pytest.raises(SettingError) as refused:
        open_storage(settings)
    assert str(refused.value).startswith("FEDCOMPUTE_BLOB_STORE_URL: bucket 'no-such-bucket' does not exist")
    assert not (tmp_path / "server" / "fedcompute.sqlite").exists()  # refused before the database was touched


def test_half_given_credentials_are_refused(tmp_path: Path, s3_endpoint: str) -> None:
    settings = Settings(workdir=tmp_path, blob_store_url=f"s3://{BUCKET}", s3_access_key_id="only-the-id")
    with pytest.raises(SettingError, match="FEDCOMPUTE_S3_SECRET_ACCESS_KEY"):
        open_blob_store(settings)


def test_unreachable_store_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1").client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", config=Config(retries={"max_attempts": 1}, connect_timeout=1)
    )
    store = S3BlobStore(client, BUCKET, "p", tmp_path / "tmp")
    with pytest.raises(Unavailable):
        store.get("0" * 64)
    with pytest.raises(Unavailable):
        store.put(b"x")
    staged = store.staging_dir() / "upload-1"
    staged.write_bytes(b"kept")
    with pytest.raises(Unavailable):
        store.put_file(staged)
    assert staged.read_bytes() == b"kept"  # left for the retry
