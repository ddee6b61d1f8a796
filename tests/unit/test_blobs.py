"""The local blob store: content addressing, atomic install, verification on every read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedcompute.core.blobs import BlobCorrupted, BlobMissing
from fedcompute.store.blobs import LocalBlobStore


def test_put_get_and_dedupe(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    sha = store.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert store.put(b"hello") == sha
    assert store.get(sha) == b"hello"
    assert b"".join(store.read_chunks(sha, 1, 2)) == b"ello"
    assert store.size(sha) == 5
    assert not list((tmp_path / "tmp").iterdir())


def test_put_file_moves_into_place(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    staged = store.staging_dir() / "x"
    staged.write_bytes(b"data")
    sha = store.put_file(staged)
    assert not staged.exists()
    assert store.get(sha) == b"data"


def test_corruption_and_missing_are_detected(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    sha = store.put(b"original")
    (tmp_path / "sha256" / sha[:2] / sha[2:]).write_bytes(b"tampered")
    with pytest.raises(BlobCorrupted):
        store.get(sha)
    with pytest.raises(BlobCorrupted):
        store.read_chunks(sha, 0, 4)
    with pytest.raises(BlobMissing):
        store.get("0" * 64)
    with pytest.raises(BlobMissing):
        store.get("../../etc/passwd")
