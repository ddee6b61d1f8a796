"""A worker sharing the server's disk reads the round's envelopes from the server's blob directory instead of
having the server stream them (``aggregator_blob_dir``, which the suite sets where blobs are local). The directory
is the server's store, as untrusted as its stream: what is read there is hashed against the input set like what is
streamed (the altered-envelope test of test_aggregation.py runs on this path), and the directory cannot make the
worker read what is not a bounded regular file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedcompute.aggregator.worker import LocalEnvelope, _digest, _regular_within
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


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "oversized"])
def test_the_blob_directory_cannot_make_the_worker_read_anything_but_a_bounded_regular_file(
    tmp_path: Path, kind: str
) -> None:
    """What the server can put where an envelope should be: a FIFO (a read would wait for a writer forever), a link
    to a file of the worker's, a directory, a file over the upload limit. Each is passed over when the job starts
    (the job is then streamed), and refused at once by the read if it appears after that check."""
    secret = tmp_path / "worker-secret"
    secret.write_bytes(b"x" * 100)
    path = tmp_path / "envelope"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(secret)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"x" * 1001)
    assert not _regular_within(path, 1000)
    began = time.monotonic()
    with pytest.raises((NotReadable, OSError)):
        _digest(LocalEnvelope("asg", path, 1000))
    assert time.monotonic() - began < 5  # refused, not waited on


def test_a_bounded_read_reads_a_regular_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "envelope"
    data = os.urandom(3 * 4096 + 17)  # not a multiple of the direct-I/O block
    path.write_bytes(data)
    assert _regular_within(path, len(data))
    assert not _regular_within(path, len(data) - 1)
    assert read_uncached(path, max_bytes=len(data)) == data
    with pytest.raises(NotReadable, match="more than"):
        read_uncached(path, max_bytes=len(data) - 1)
    assert _digest(LocalEnvelope("asg", path, len(data)))[1] == data
