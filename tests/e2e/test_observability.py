"""What an SRE sees: a real Prometheus scraping `fedcompute up` (every process), `promtool check metrics` clean
for each, the device funnel and rounds counted, and one request id followed across processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcompute.rpc.channels import open_channel
from tests.harness import wait_for

CLI = [sys.executable, "-m", "fedcompute.cli"]


@pytest.fixture(scope="session")
def prometheus() -> tuple[str, str]:
    """Debian's prometheus package (prometheus, promtool): installed here if missing and possible; in CI its
    absence fails the test, elsewhere it is skipped with the reason."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if not all(found) and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
            env=env, capture_output=True, timeout=900, check=False,
        )  # fmt: skip
        found = shutil.which("prometheus"), shutil.which("promtool")
    if not all(found):
        reason = "Debian's prometheus package is not installed and could not be installed (apt-get as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return str(found[0]), str(found[1])


def _free_block(count: int, start: int) -> int:
    """A base port with ``count`` free ports after it (`up` hands out metrics and key service ports in order)."""
    for base in range(start, start + 8000, 37):
        try:
            sockets = []
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    raise RuntimeError("no free block of ports")


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


def _at_least(query: Callable[[str], list[Any]], expr: str, least: float) -> bool:
    result = query(expr)
    return bool(result) and float(result[0]["value"][1]) >= least


def _get(url: str) -> Any:
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    work, port, base, keys = tmp_path / "w", _free_port(), _free_block(6, 21000), _free_block(3, 31000)
    env = {
        **os.environ,
        "FEDCOMPUTE_METRICS_PORT": str(base),
        "FEDCOMPUTE_KEY_SERVICE_PORT": str(keys),
        "FEDCOMPUTE_VERIFIER_PORT": "0",
        "FEDCOMPUTE_LOG_LEVEL": "INFO",
        "FEDCOMPUTE_LOG_JSON": "true",
        "FEDCOMPUTE_POLL_INTERVAL_S": "0.1",
        "FEDCOMPUTE_RETRY_DELAY_MIN_S": "0.05",
        "FEDCOMPUTE_RETRY_DELAY_MAX_S": "0.2",
        "FEDCOMPUTE_DEVICE_RATE_PER_S": "0",
    }
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([*CLI, "up", "--plaintext", "--workdir", str(work), "--port", str(port)], env=env, stderr=log)
    try:
        wait_for(lambda: _serving(f"127.0.0.1:{port}"), 120, "fedcompute up")
        targets = work / "public" / "prometheus-targets.json"
        wait_for(targets.exists, 30, "the Prometheus targets file")
        yield {
            "env": env, "work": work, "server": f"127.0.0.1:{port}", "targets": targets, "log": tmp_path / "up.log",
            "keys": [f"127.0.0.1:{keys + i}" for i in range(3)],
        }  # fmt: skip
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()


def test_prometheus_scrapes_every_component_and_promtool_is_clean(
    prometheus: tuple[str, str], stack: dict[str, Any], tmp_path: Path
) -> None:
    prometheus_bin, promtool = prometheus
    targets = json.loads(stack["targets"].read_text())
    components = sorted(t["labels"]["component"] for t in targets)
    assert components == ["aggregator", "keys", "keys", "keys", "server"]  # main process, 3 key services, worker

    # A round, so that the funnel, the jobs and the key releases have something to count.
    env = {**stack["env"], "FEDCOMPUTE_PLAINTEXT": "true", "FEDCOMPUTE_WORKDIR": str(stack["work"])}
    env["FEDCOMPUTE_KEY_SERVICE_ADDRESSES"] = json.dumps(stack["keys"])
    env["FEDCOMPUTE_OPERATOR_TOKEN"] = (stack["work"] / "operator" / "operator-token").read_text().strip()
    server = stack["server"]
    subprocess.run(
        [*CLI, "task", "create", "--server", server, "--population", "obs", "--rounds", "1", "--report-goal", "2",
         "--max-cohort", "2"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    fleet = subprocess.run(
        [*CLI, "devices", "simulate", "--server", server, "--population", "obs", "--count", "2", "--max-sleep",
         "0.2", "--trusted-providers", str(stack["work"] / "public" / "trusted-providers.json")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert fleet.returncode == 0, fleet.stderr
    assert "uploads 2," in fleet.stdout

    # Every endpoint's exposition passes promtool's lint.
    for target in targets:
        address = target["targets"][0]
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read()
        checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert checked.returncode == 0, (target, checked.stdout.decode(), checked.stderr.decode())
        assert b"fedcompute_" in text

    # A real Prometheus, discovering the targets from the file `up` wrote.
    web = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: fedcompute\n"
        f"    file_sd_configs: [{{files: ['{stack['targets']}'], refresh_interval: 1s}}]\n"
    )
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    prom = subprocess.Popen(
        [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    api = f"http://127.0.0.1:{web}/api/v1"

    def query(expr: str) -> list[Any]:
        try:
            return list(_get(f"{api}/query?query={urllib.parse.quote(expr)}")["data"]["result"])
        except OSError:
            return []

    def all_up() -> bool:
        try:
            active = _get(f"{api}/targets")["data"]["activeTargets"]
        except OSError:
            return False
        return len(active) == len(targets) and all(t["health"] == "up" for t in active)

    try:
        wait_for(all_up, 90, "Prometheus to scrape every component")
        for expr, least in [
            ('sum(fedcompute_server_checkins_total{result="assigned"})', 2),
            ("sum(fedcompute_server_uploads_completed_total)", 2),
            ('sum(fedcompute_server_round_contributions_total{result="accepted"})', 2),
            ("sum(fedcompute_keys_share_releases_total)", 2),
            ('sum(fedcompute_aggregator_jobs_total{result="completed"})', 1),
            ("sum(fedcompute_modelupdater_versions_published_total)", 1),
            ("count(fedcompute_server_build_info)", 1),
            ("count(fedcompute_keys_build_info)", 3),
            ("count(process_resident_memory_bytes)", len(targets)),
        ]:
            wait_for(partial(_at_least, query, expr, least), 60, expr)
    finally:
        prom.terminate()
        prom.wait(timeout=30)

    # One request id per aggregation job, logged by the worker, the server and the key services (three kinds of
    # process), and the start-up line of every component with its address, version and configuration.
    lines = [json.loads(x) for x in stack["log"].read_text().splitlines() if x.startswith("{")]
    by_job: dict[str, set[str]] = {}
    for line in lines:
        rid = str(line.get("request_id", ""))
        if rid.startswith("job-"):
            by_job.setdefault(rid, set()).add(str(line["component"]))
    assert any({"aggregator", "up", "keys"} <= seen for seen in by_job.values()), by_job
    started = [x for x in lines if x.get("event") == "component_started"]
    assert {x["component"] for x in started} >= {"up", "keys", "aggregator"}
    for line in lines:
        assert {"component", "process", "version", "timestamp", "level"} <= set(line), line
    assert not any("operator_token" in x.get("config", {}) and x["config"]["operator_token"] not in ("", "<set>")
                   for x in started)  # fmt: skip
