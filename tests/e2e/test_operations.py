"""Starting and stopping components as an operator does: bad settings are one line naming the variable (exit 2),
`config check` validates without starting, SIGTERM drains and exits, `certs dev` makes working certificates."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcompute.rpc.channels import open_channel
from tests.harness import wait_for

CLI = [sys.executable, "-m", "fedcompute.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCOMPUTE_") or k.startswith("FEDCOMPUTE_TEST_")}
    settings = {"workdir": str(tmp_path / "w"), "plaintext": "true", **values}
    env.update({f"FEDCOMPUTE_{k.upper()}": v for k, v in settings.items()})
    return env


def _status(address: str) -> int:
    try:
        reply = health_pb2_grpc.HealthStub(open_channel(address)).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except Exception:
        return -1
    return int(reply.status)


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"databse_url": "sqlite:///x"}, "FEDCOMPUTE_DATABSE_URL: no such setting"),
        ({"database_url": "postgres:/nohost"}, "FEDCOMPUTE_DATABASE_URL: not a database URL"),
        ({"tls_cert_file": "/nonexistent/server.pem"}, "FEDCOMPUTE_TLS_CERT_FILE: no such file"),
        ({"server_port": "99999"}, "FEDCOMPUTE_SERVER_PORT: "),
        ({"blob_store_url": "ftp://x"}, "FEDCOMPUTE_BLOB_STORE_URL: "),
        ({"plaintext": "false"}, "FEDCOMPUTE_TLS_CA_FILE: no CA to verify servers with"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path: Path, values: dict[str, str], variable: str) -> None:
    done = subprocess.run([*CLI, "serve", "server"], env=_env(tmp_path, **{"server_port": "0", **values}),
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert variable in lines[0]
    assert "Traceback" not in done.stderr


def test_a_busy_port_names_its_setting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([*CLI, "serve", "keys"], env=_env(tmp_path, key_service_port=str(port)),
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("{")]  # JSON log lines aside
    assert errors == [
        f"keys not started: FEDCOMPUTE_KEY_SERVICE_PORT: cannot bind 127.0.0.1:{port}: the port is in use"
    ]


def test_config_check_validates_a_deployment_without_starting_it(tmp_path: Path) -> None:
    ok = subprocess.run([*CLI, "config", "check", "modelupdater"], env=_env(tmp_path), capture_output=True,
                        text=True, timeout=120, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("modelupdater: ok")
    down = _env(tmp_path, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/nothing")
    bad = subprocess.run([*CLI, "config", "check", "server"], env=down, capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 2
    assert "FEDCOMPUTE_DATABASE_URL: cannot reach the database" in bad.stderr
    no_trust = subprocess.run([*CLI, "config", "check", "dealer"], env=_env(tmp_path), capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
    assert no_trust.returncode == 2
    assert "FEDCOMPUTE_TRUSTED_PROVIDERS_FILE: no trusted-providers file" in no_trust.stderr
    listed = subprocess.run([*CLI, "config", "list"], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=120, check=True)  # fmt: skip
    assert "FEDCOMPUTE_OPERATOR_TOKEN= [secret]" in listed.stdout


def test_sigterm_drains_and_exits(tmp_path: Path) -> None:
    port = _free_port()
    env = _env(tmp_path, server_port=str(port), shutdown_grace_s="2")
    proc = subprocess.Popen([*CLI, "serve", "server"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _status(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING, 90, "the server")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert _status(f"127.0.0.1:{port}") == -1  # gone
    finally:
        if proc.poll() is None:
            proc.kill()


def test_certs_dev_makes_a_ca_and_a_certificate_per_component(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    done = subprocess.run([*CLI, "certs", "dev", "--out", str(out), "--host", "fedcompute.example"],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert "FEDCOMPUTE_TLS_CA_FILE=" in done.stdout
    for name in ("server", "keys", "verifier", "dealer", "aggregator", "modelupdater", "operator"):
        assert (out / f"{name}.pem").is_file()
        assert (out / f"{name}-key.pem").stat().st_mode & 0o077 == 0  # private keys readable by the owner only
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fedcompute.example" in names.get_values_for_type(x509.DNSName)
    assert "fedcompute-server" in names.get_values_for_type(x509.DNSName)


def test_up_tls_serves_only_tls_with_mtls_inside(tmp_path: Path) -> None:
    from fedcompute.core.settings import Settings
    from fedcompute.rpc.channels import channel_for

    port, work = _free_port(), tmp_path / "w"
    env = _env(tmp_path, key_service_port="0", verifier_port="0", plaintext="false")
    proc = subprocess.Popen([*CLI, "up", "--tls", "--workdir", str(work), "--port", str(port)], env=env,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        tls = work / "tls"

        def serving_over_tls() -> bool:
            if not (tls / "operator-key.pem").exists():
                return False
            operator = Settings(
                tls_ca_file=tls / "ca.pem", tls_cert_file=tls / "operator.pem", tls_key_file=tls / "operator-key.pem"
            )
            channel = channel_for(operator, f"localhost:{port}")
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except Exception:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        wait_for(serving_over_tls, 120, "`up --tls`")
        assert _status(f"127.0.0.1:{port}") == -1  # a plaintext client gets nothing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
