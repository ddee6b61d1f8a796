"""Client channels: which connection a call goes over (rpc/channels.py open_channel)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from fedcompute.rpc.channels import open_channel

METHOD = "/test.Peer/Who"


@pytest.fixture
def peer_server() -> Iterator[str]:
    """A real gRPC server whose one method answers with the caller's address as the server sees it."""

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return context.peer().encode()

    handler = grpc.unary_unary_rpc_method_handler(who)  # raw bytes both ways
    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        handlers=[grpc.method_handlers_generic_handler("test.Peer", {"Who": handler})],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _peers(address: str, own_connection: bool) -> set[bytes]:
    channels = [open_channel(address, own_connection=own_connection) for _ in range(4)]
    try:
        return {channel.unary_unary(METHOD, None, None)(b"", timeout=10) for channel in channels}
    finally:
        for channel in channels:
            channel.close()


def test_channels_share_one_connection_unless_each_asks_for_its_own(peer_server: str) -> None:
    """A process playing several devices (the benchmarks' load generators) gives each its own connection, as
    separate devices have; by default gRPC pools one connection per address in a process."""
    assert len(_peers(peer_server, own_connection=False)) == 1
    assert len(_peers(peer_server, own_connection=True)) == 4
