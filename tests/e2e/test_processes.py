"""The parts operators run on their own, as separate processes: `serve` per component, `up`, `devices simulate`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
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


def _serving(address: str) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(open_channel(address)).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except Exception:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_components_as_separate_processes(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """The multi-machine deployment, on one machine: every component its own process, three key providers."""
    server_port, verifier_port, metrics_port = _free_port(), _free_port(), _free_port()
    key_ports = [_free_port() for _ in range(3)]
    key_addresses = [f"127.0.0.1:{p}" for p in key_ports]
    trusted = tmp_path / "work" / "public" / "trusted-providers.json"
    env = {
        **os.environ,
        "FEDCOMPUTE_WORKDIR": str(tmp_path / "work"),
        "FEDCOMPUTE_SERVER_PORT": str(server_port),
        "FEDCOMPUTE_VERIFIER_PORT": str(verifier_port),
        "FEDCOMPUTE_PLAINTEXT": "true",
        "FEDCOMPUTE_DEVICE_RATE_PER_S": "0",  # every simulated device is 127.0.0.1
        "FEDCOMPUTE_SERVER_ADDRESS": f"127.0.0.1:{server_port}",
        "FEDCOMPUTE_VERIFIER_ADDRESS": f"127.0.0.1:{verifier_port}",
        "FEDCOMPUTE_KEY_SERVICE_ADDRESSES": json.dumps(key_addresses),
        "FEDCOMPUTE_RETRY_DELAY_MIN_S": "0.05",
        "FEDCOMPUTE_RETRY_DELAY_MAX_S": "0.2",
        "FEDCOMPUTE_POLL_INTERVAL_S": "0.1",
    }
    for i, port in enumerate(key_ports):
        key_env = {**env, "FEDCOMPUTE_PROVIDER_ID": f"kp-{i}", "FEDCOMPUTE_KEY_SERVICE_PORT": str(port)}
        processes.append(subprocess.Popen([*CLI, "serve", "keys"], env=key_env))
    wait_for(lambda: all(_serving(a) for a in key_addresses), 60, "key services")
    trust = [*CLI, "keys", "trust", "--out", str(trusted)]
    for address in key_addresses:
        trust += ["--key-service", address]
    subprocess.run(trust, env=env, check=True, timeout=60)
    # The launcher first: it holds the platform CA and publishes its public key, which the verifier reads.
    worker_health = _free_port()  # the worker's: it serves no other RPC
    processes.append(
        subprocess.Popen([*CLI, "serve", "aggregator"], env={**env, "FEDCOMPUTE_HEALTH_PORT": str(worker_health)})
    )
    ca_public = tmp_path / "work" / "public" / "platform-ca-public.pem"
    wait_for(ca_public.exists, 60, "the platform CA's public key")
    processes.append(subprocess.Popen([*CLI, "serve", "verifier"], env=env))
    processes.append(
        subprocess.Popen([*CLI, "serve", "server"], env={**env, "FEDCOMPUTE_METRICS_PORT": str(metrics_port)})
    )
    wait_for(lambda: _serving(f"127.0.0.1:{server_port}") and _serving(f"127.0.0.1:{verifier_port}"), 60, "servers")
    made = subprocess.run(
        [*CLI, "token", "create", "--name", "ops", "--role", "operator"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    env["FEDCOMPUTE_OPERATOR_TOKEN"] = made.stdout.strip()  # for the dealer and the task commands
    # the worker is SERVING once what it depends on is: the server, the verifier, t key services
    wait_for(lambda: _serving(f"127.0.0.1:{worker_health}"), 60, "the worker's health")
    health = {"dealer": _free_port(), "modelupdater": _free_port()}  # components without RPCs of their own
    for component, port in health.items():
        processes.append(subprocess.Popen([*CLI, "serve", component], env={**env, "FEDCOMPUTE_HEALTH_PORT": str(port)}))
    wait_for(lambda: all(_serving(f"127.0.0.1:{p}") for p in health.values()), 60, "dealer and model updater health")
    # key services, verifier and dealer never load torch (seconds and hundreds of MB); the server does, for the
    # initial weights of the tasks it creates, which shows the probe sees a loaded library
    mapped = {str(p.args[-1]): "libtorch" in Path(f"/proc/{p.pid}/maps").read_text() for p in processes}  # type: ignore[index]
    assert mapped == {"keys": False, "aggregator": False, "verifier": False, "server": True, "dealer": False,
                      "modelupdater": True}  # fmt: skip
    server = f"127.0.0.1:{server_port}"
    created = subprocess.run(
        [*CLI, "task", "create", "--server", server, "--population", "procs", "--rounds", "2",
         "--report-goal", "3", "--max-cohort", "3", "--local-epochs", "2"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    task_id = json.loads(created.stdout)["task_id"]
    fleet = subprocess.run(
        [*CLI, "devices", "simulate", "--server", server, "--population", "procs", "--count", "4",
         "--max-sleep", "0.2", "--trusted-providers", str(trusted), "--threshold", "2"],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert fleet.returncode == 0, fleet.stderr
    assert "uploads 6," in fleet.stdout  # 2 rounds x a cohort of 3
    assert "refused keys or policies 0," in fleet.stdout
    got = subprocess.run(
        [*CLI, "task", "get", task_id, "--server", server], env=env, capture_output=True, text=True, check=True
    )
    task = json.loads(got.stdout)
    assert task["status"] == "TASK_STATUS_COMPLETED"
    assert task["latest_model_version"] == "3"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'fedcompute_server_rpcs_handled_total{code="OK",method="CreateTaskAssignment"' in metrics


def test_up_serves_until_terminated(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    port = _free_port()
    env = {**os.environ, "FEDCOMPUTE_KEY_SERVICE_PORT": "0", "FEDCOMPUTE_VERIFIER_PORT": "0"}
    proc = subprocess.Popen([*CLI, "up", "--plaintext", "--workdir", str(tmp_path / "w"), "--port", str(port)], env=env)
    processes.append(proc)
    wait_for(lambda: _serving(f"127.0.0.1:{port}"), 90, "fedcompute up")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
