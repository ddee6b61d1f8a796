"""Downloads: a task's plan and its model versions, by name, in chunks, with size and sha256 up front."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from fedcompute.core.blobs import BlobCorrupted, BlobStore
from fedcompute.core.errors import DataLoss, InvalidArgument, NotFound
from fedcompute.store.database import Database
from fedcompute.store.model_versions import ModelVersionRepository
from fedcompute.store.tasks import TaskRepository

_PLAN = re.compile(r"^plans/([A-Za-z0-9_-]+)$")
_MODEL = re.compile(r"^models/([A-Za-z0-9_-]+)/([0-9]{1,18})$")
MAX_VERSION = 2**31 - 1  # model versions are stored as 32-bit integers: a larger one names no version


def plan_resource_name(task_id: str) -> str:
    return f"plans/{task_id}"


def model_resource_name(task_id: str, version: int) -> str:
    return f"models/{task_id}/{version}"


@dataclass(frozen=True)
class Download:
    total_size: int
    sha256_hex: str
    chunks: Iterator[bytes]


class ResourceService:
    def __init__(self, db: Database, blobs: BlobStore, chunk_size: int) -> None:
        self._db = db
        self._blobs = blobs
        self._chunk = chunk_size

    def read(self, resource_name: str, offset: int) -> Download:
        if offset < 0:
            raise InvalidArgument("read_offset", "must be >= 0")
        if match := _PLAN.match(resource_name):
            with self._db.reading() as s:
                plan = TaskRepository(s).plan(match.group(1))
            if plan is None:
                raise NotFound(f"no plan {resource_name!r}")
            return Download(len(plan), hashlib.sha256(plan).hexdigest(), _slices(plan, offset, self._chunk))
        if match := _MODEL.match(resource_name):
            number = int(match.group(2))
            with self._db.reading() as s:
                version = ModelVersionRepository(s).get(match.group(1), number) if number <= MAX_VERSION else None
            if version is None:
                raise NotFound(f"no model version {resource_name!r}")
            try:
                chunks = self._blobs.read_chunks(version.checkpoint_sha256, offset, self._chunk)
            except BlobCorrupted:
                raise DataLoss(f"{resource_name} is corrupted in storage; an operator must restore it") from None
            return Download(version.size_bytes, version.checkpoint_sha256, chunks)
        raise InvalidArgument("resource_name", "must be 'plans/{task_id}' or 'models/{task_id}/{version}'")


def _slices(data: bytes, offset: int, size: int) -> Iterator[bytes]:
    for start in range(offset, len(data), size):
        yield data[start : start + size]
