"""The reference device's downloads over real gRPC: resumed from the bytes received when interrupted, refused when
the resource changes between tries, and given up on when a server keeps them from ending."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, update

from fedcompute.clients import device
from fedcompute.clients.device import IntegrityError, download
from fedcompute.store.models import ModelVersionRow
from fedcompute.v1 import common_pb2, resource_pb2
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness

CHUNK = 1024 * 1024  # the server's default chunk size


class _Cut(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class _CutReads:
    """The real resource client, but the network cuts each of the first ``cuts`` streams after ``keep`` responses
    (the call ends with ``code``); every ReadRequest is recorded."""

    def __init__(self, real: Any, cuts: int, keep: int = 1, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self._real, self.cuts, self._keep, self._code = real, cuts, keep, code
        self.requests: list[resource_pb2.ReadRequest] = []
        self.before_each: list[Any] = []  # called before each try's first response

    def read(self, request: resource_pb2.ReadRequest) -> Iterator[resource_pb2.ReadResponse]:
        self.requests.append(resource_pb2.ReadRequest.FromString(request.SerializeToString()))
        if len(self.before_each) >= len(self.requests):
            self.before_each[len(self.requests) - 1]()
        stream = self._real.read(request)
        if len(self.requests) > self.cuts:
            yield from stream
            return
        for _, response in zip(range(self._keep), stream, strict=False):
            yield response
        stream.cancel()
        raise _Cut(self._code)


def _model(harness: Harness) -> common_pb2.Resource:
    task = harness.create_task(model_architecture="bench-1m", report_goal=2, max_cohort=3)
    request = tm.ListModelVersionsRequest(task_id=task.task_id)
    model = harness.operators.list_model_versions(request).versions[0].checkpoint
    assert model.size_bytes > 4 * CHUNK  # five chunks
    return model


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_an_interrupted_download_goes_on_from_the_bytes_received(harness: Harness, code: grpc.StatusCode) -> None:
    """Two streams are cut after their first chunk (the server away; the server ending a stream gone quiet): the
    device asks from 1 MiB, then 2 MiB, and gets the model whole. Before 2026-12-02 an interrupted download was not
    resumed at all: the device reported an error and had to check in again for the whole model."""
    model = _model(harness)
    whole = download(harness.resources, model)
    cut = _CutReads(harness.resources, cuts=2, code=code)
    assert download(cut, model) == whole  # type: ignore[arg-type]
    assert [r.read_offset for r in cut.requests] == [0, CHUNK, 2 * CHUNK]
    assert {r.resource_name for r in cut.requests} == {model.resource_name}


def test_a_download_whose_resource_changes_between_tries_is_refused(harness: Harness, database_url: str) -> None:
    """The server, after cutting the first stream, serves other bytes of the same length under the declared
    resource (its database pointed at another blob): the resumed bytes do not hash with the first ones to the
    declared sha256, and the device refuses the whole."""
    model = _model(harness)
    whole = download(harness.resources, model)
    other = harness.suite.server.blobs.put(whole[:CHUNK] + bytes(len(whole) - CHUNK))

    def swap() -> None:
        engine = create_engine(database_url)
        with engine.begin() as conn:
            conn.execute(update(ModelVersionRow).values(checkpoint_sha256=other))
        engine.dispose()

    cut = _CutReads(harness.resources, cuts=1)
    cut.before_each = [lambda: None, swap]
    with pytest.raises(IntegrityError, match="does not match its declared"):
        download(cut, model)  # type: ignore[arg-type]
    assert [r.read_offset for r in cut.requests] == [0, CHUNK]


class _Dribble:
    """A hostile server: each stream sends ``per_try`` bytes of the resource, then ends UNAVAILABLE."""

    def __init__(self, per_try: int) -> None:
        self.per_try = per_try
        self.tries = 0

    def read(self, request: resource_pb2.ReadRequest) -> Iterator[resource_pb2.ReadResponse]:
        self.tries += 1
        if self.per_try:
            yield resource_pb2.ReadResponse(data=bytes(self.per_try))
        raise _Cut(grpc.StatusCode.UNAVAILABLE)


@pytest.mark.parametrize(("per_try", "tries"), [(0, device.DOWNLOAD_ATTEMPTS), (1, device.MAX_DOWNLOAD_ATTEMPTS)])
def test_a_server_that_keeps_a_download_from_ending_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch, per_try: int, tries: int
) -> None:
    """Streams that end before the resource does, with nothing each time (given up after DOWNLOAD_ATTEMPTS tries
    in a row) or a byte each time (after MAX_DOWNLOAD_ATTEMPTS in all): the device stops with the last error, it
    does not read for ever. (No waits between tries here: the backoff is the upload's, tested there.)"""
    monkeypatch.setattr(device, "_BACKOFF", lambda state: 0.0)
    server = _Dribble(per_try)
    resource = common_pb2.Resource(resource_name="models/t/1", size_bytes=10_000, sha256_hex="00" * 32)
    with pytest.raises(grpc.RpcError) as info:
        download(server, resource)  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.tries == tries


def test_a_download_gives_up_after_its_patience_without_a_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """No byte for DOWNLOAD_PATIENCE_S (here 0.3 s) ends the tries, however few they were."""
    monkeypatch.setattr(device, "DOWNLOAD_PATIENCE_S", 0.3)
    monkeypatch.setattr(device, "_BACKOFF", lambda state: 0.2)
    server = _Dribble(0)
    resource = common_pb2.Resource(resource_name="models/t/1", size_bytes=10_000, sha256_hex="00" * 32)
    with pytest.raises(grpc.RpcError):
        download(server, resource)  # type: ignore[arg-type]
    assert server.tries == 3  # at 0, 0.2 and 0.3 s: the second wait is cut to the patience's end, one last try
