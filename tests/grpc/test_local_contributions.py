"""A worker sharing the server's disk reads the round's envelopes from the server's blob directory instead of
having the server stream them (``aggregator_blob_dir``, which the suite sets where blobs are local). The directory
is the server's store, as untrusted as its stream: what is read there is hashed against the input set like what is
streamed (the altered-envelope test of test_aggregation.py runs on this path), and the directory cannot make the
worker read what is not a bounded regular file."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from fedcompute.aggregator.opener import LocalEnvelope, local_envelopes
from fedcompute.aggregator.opener import read_and_hash as _digest
from fedcompute.clients.device import upload
from fedcompute.core.files import NotReadable, read_uncached
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, sealed, suite_settings, wait_for

STREAM = {"service": "AggregationService", "method": "StreamContributions"}


def _streams(harness: Harness) -> float:
    """StreamContributions calls the server has received (its registry is the process's: read a difference)."""
    return harness.suite.server.registry.get_sample_value("fedcompute_server_rpcs_started_total", STREAM) or 0.0


def _round(harness: Harness, devices: int = 3) -> tm.Task:
    task = harness.create_task(report_goal=devices, max_cohort=devices, min_clients=1)
    for _ in range(devices):
        a = harness.check_in().task_assignment
        upload(harness.uploads, harness.report(a).upload_instruction, sealed(a))
    wait_for(lambda: harness.iterations(task.task_id)[0].status == tm.ITERATION_STATUS_COMPLETED, what="the round")
    return task


@pytest.mark.aggregator
def test_a_worker_on_the_servers_disk_aggregates_from_its_blob_directory_without_the_stream(harness: Harness) -> None:
    before = _streams(harness)
    task = _round(harness)
    assert harness.iterations(task.task_id)[0].accepted_contributions == 3
    assert _streams(harness) == before  # nothing was streamed: the worker read the three envelopes itself


def test_a_worker_whose_blob_directory_lacks_the_envelopes_has_them_streamed(database_url: str, tmp_path: Path) -> None:
    """Pointed at a directory without the round's envelopes (another disk's, an emptied one), the worker asks the
    server for the stream, and the round completes as before."""
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    settings = suite_settings(tmp_path / "work", database_url, max_upload_bytes=64 * 1024, aggregator_blob_dir=empty)
    harness = Harness.start(settings, aggregator=True)
    try:
        before = _streams(harness)
        task = _round(harness)
        assert harness.iterations(task.task_id)[0].accepted_contributions == 3
        assert _streams(harness) == before + 1
    finally:
        harness.stop()


def _in_directory(tmp_path: Path, sha256_hex: str) -> Path:
    """Where the blob directory ``tmp_path`` keeps the envelope of this address (its parent made)."""
    path = tmp_path / "sha256" / sha256_hex[:2] / sha256_hex[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "oversized", "missing"])
def test_the_blob_directory_cannot_make_the_worker_read_anything_but_a_bounded_regular_file(
    tmp_path: Path, kind: str
) -> None:
    """What the server can put where an envelope should be: a FIFO (a read would wait for a writer forever), a link
    to a file of the worker's, a directory, a file over the upload limit, nothing. Each is passed over when the job
    starts (the job is then streamed), and refused at once by the read if it appears after that check."""
    secret = tmp_path / "worker-secret"
    secret.write_bytes(b"x" * 100)
    good, bad = "a" * 64, "b" * 64
    _in_directory(tmp_path, good).write_bytes(b"x" * 1000)
    path = _in_directory(tmp_path, bad)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(secret)
    elif kind == "directory":
        path.mkdir()
    elif kind == "oversized":
        path.write_bytes(b"x" * 1001)
    local, missing = local_envelopes(tmp_path, [("asg-1", good), ("asg-2", bad)], 1000)
    assert missing == ["asg-2"]
    assert [e.assignment_id for e in local] == ["asg-1"]
    if kind == "missing":
        return
    began = time.monotonic()
    with pytest.raises(OSError, match=r"not a regular file|more than|symbolic links"):  # ELOOP for the link
        _digest(LocalEnvelope("asg-2", path, 1000))
    assert time.monotonic() - began < 5  # refused, not waited on


@pytest.mark.parametrize("crafted", ["absolute", "climbing", "uppercase"])
def test_an_input_address_that_is_not_a_sha256_never_names_a_path_outside_the_blob_directory(
    tmp_path: Path, crafted: str
) -> None:
    """The job's input list is the server's: an address crafted as a path is not looked up at all (the job is then
    streamed, and the worker's hash check refuses it). Each address below, joined as ``sha256/<2>/<rest>``, would
    name an existing regular file the bound admits: a file of the worker's, or one beside the blob directory."""
    blobs = tmp_path / "blobs"
    (blobs / "sha256").mkdir(parents=True)
    secret = tmp_path / "worker-secret"
    secret.write_bytes(b"x" * 100)
    (blobs / "worker-secret").write_bytes(b"x" * 100)
    upper = "A" * 64
    (blobs / "sha256" / upper[:2]).mkdir()
    (blobs / "sha256" / upper[:2] / upper[2:]).write_bytes(b"x" * 100)
    address = {"absolute": "zz" + str(secret), "climbing": "..worker-secret", "uppercase": upper}[crafted]
    naive = blobs / "sha256" / address[:2] / address[2:]
    assert naive.is_file()  # what a plain join would have read
    assert local_envelopes(blobs, [("asg-1", address)], 1000) == ([], ["asg-1"])


def test_a_bounded_read_reads_a_regular_file_whole(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 17)  # not a multiple of the direct-I/O block
    address = hashlib.sha256(data).hexdigest()
    path = _in_directory(tmp_path, address)
    path.write_bytes(data)
    assert local_envelopes(tmp_path, [("asg", address)], len(data)) == ([LocalEnvelope("asg", path, len(data))], [])
    assert local_envelopes(tmp_path, [("asg", address)], len(data) - 1) == ([], ["asg"])
    assert read_uncached(path, max_bytes=len(data)) == data
    with pytest.raises(NotReadable, match="more than"):
        read_uncached(path, max_bytes=len(data) - 1)
    assert _digest(LocalEnvelope("asg", path, len(data))) == ("asg", data, address)
