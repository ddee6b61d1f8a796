"""Transport security: TLS on every server, mTLS on internal ones, a whole round all-TLS."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from fedcompute.core.settings import SettingError, Settings
from fedcompute.rpc.certs import make_dev_certs
from fedcompute.rpc.channels import channel_for, open_channel
from fedcompute.rpc.serving import build_grpc_server
from fedcompute.rpc.tls import ClientTls
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, contribute, suite_settings, wait_for


def _check(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    return int(reply.status)


def test_mtls_port_refuses_clients_without_a_valid_certificate_and_serves_the_others(tmp_path: Path) -> None:
    ours, theirs = make_dev_certs(tmp_path / "ours"), make_dev_certs(tmp_path / "theirs")
    settings = Settings(
        key_service_port=0, tls_ca_file=ours.ca, tls_cert_file=ours.cert("keys"), tls_key_file=ours.key("keys"),
        tls_client_auth=True,
    )  # fmt: skip
    server = build_grpc_server(settings, "keys", "key_service_port", [], CollectorRegistry())
    address = f"localhost:{server.port}"
    good = Settings(tls_ca_file=ours.ca, tls_cert_file=ours.cert("server"), tls_key_file=ours.key("server"))
    try:
        assert _check(channel_for(good, address)) == health_pb2.HealthCheckResponse.SERVING
        ca = ours.ca.read_bytes()
        bad_clients = {
            "no certificate": ClientTls(ca, None, None),
            "another CA's certificate": ClientTls(
                ca, theirs.cert("server").read_bytes(), theirs.key("server").read_bytes()
            ),
        }
        for what, tls in bad_clients.items():
            with pytest.raises(grpc.RpcError) as info:
                _check(open_channel(address, tls=tls))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, what  # the handshake failed
        with pytest.raises(grpc.RpcError):
            _check(open_channel(address))  # plaintext to a TLS port
        with pytest.raises(grpc.RpcError):  # a server certificate from a CA the client does not trust
            _check(open_channel(address, tls=ClientTls(theirs.ca.read_bytes(), None, None)))
        assert _check(channel_for(good, address)) == health_pb2.HealthCheckResponse.SERVING  # still serving
    finally:
        server.stop(grace=0)


def test_plaintext_needs_saying_so(tmp_path: Path) -> None:
    with pytest.raises(SettingError) as info:
        build_grpc_server(Settings(server_port=0), "server", "server_port", [], CollectorRegistry())
    assert str(info.value).startswith("FEDCOMPUTE_TLS_CERT_FILE: no TLS files are configured")
    with pytest.raises(SettingError) as info:
        channel_for(Settings(), "127.0.0.1:1")
    assert str(info.value).startswith("FEDCOMPUTE_TLS_CA_FILE: ")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_whole_round_all_tls(tmp_path: Path, backend: str) -> None:
    """Server TLS, key services and verifier mTLS, the worker (its own process) a TLS client of all three."""
    certs = make_dev_certs(tmp_path / "tls")
    settings = suite_settings(
        tmp_path / "w", f"sqlite:///{tmp_path / 'db.sqlite'}", plaintext=False, tls_ca_file=certs.ca,
        tls_cert_file=certs.cert("server"), tls_key_file=certs.key("server"),
    )  # fmt: skip
    harness = Harness.start(settings)
    try:
        with pytest.raises(grpc.RpcError):  # the key services ask for a client certificate
            _check(open_channel(harness.suite.key_addresses[0], tls=ClientTls(certs.ca.read_bytes(), None, None)))
        task = harness.create_task("tls")
        for _ in range(2):
            contribute(harness, "tls")
        wait_for(lambda: harness.task(task.task_id).latest_model_version >= 2, 90, "the round to be released")
        versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id))
        assert len(versions.versions) == 2
    finally:
        harness.stop()
