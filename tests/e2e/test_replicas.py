"""Replicas: `fedcompute up --replicas 2 --workers 2` on one Postgres runs a task to completion, with two server
processes sharing one port (SO_REUSEPORT) and two attested workers taking jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

from tests.conftest import fresh_postgres
from tests.e2e.test_processes import CLI, _free_port, _serving
from tests.harness import wait_for


def _children(pid: int) -> list[str]:
    """Command lines of the direct children of ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_two_server_replicas_and_two_workers_on_one_postgres(tmp_path: Path, postgres_database: str) -> None:
    url = fresh_postgres(postgres_database)
    port = _free_port()
    work = tmp_path / "w"
    env = {
        **os.environ,
        "FEDCOMPUTE_KEY_SERVICE_PORT": "0",
        "FEDCOMPUTE_VERIFIER_PORT": "0",
        "FEDCOMPUTE_POLL_INTERVAL_S": "0.1",
        "FEDCOMPUTE_RETRY_DELAY_MIN_S": "0.05",
        "FEDCOMPUTE_RETRY_DELAY_MAX_S": "0.2",
        "FEDCOMPUTE_LOG_LEVEL": "WARNING",
        "FEDCOMPUTE_PLAINTEXT": "true",
        "FEDCOMPUTE_DEVICE_RATE_PER_S": "0",  # every simulated device is 127.0.0.1
    }
    up = subprocess.Popen(
        [*CLI, "up", "--workdir", str(work), "--database-url", url, "--port", str(port), "--replicas", "2",
         "--workers", "2"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert up.stderr is not None
        line = ""
        while "key services" not in line:
            line = up.stderr.readline()
            assert line or up.poll() is None, "up exited"
        keys = re.search(r"key services (.*)$", line.strip())
        assert keys is not None
        threading.Thread(target=up.stderr.read, daemon=True).start()  # keep draining: a full pipe would block up
        wait_for(lambda: _serving(f"127.0.0.1:{port}"), 60, "the server")

        def count(what: str) -> int:
            return sum(what in c for c in _children(up.pid))

        wait_for(lambda: count("serve server") == 1, 30, "the second replica (the first runs inside `up`)")
        wait_for(lambda: count("fedcompute.aggregator.main") == 2, 30, "two workers")
        task_env = {
            **env,
            "FEDCOMPUTE_WORKDIR": str(work),
            "FEDCOMPUTE_KEY_SERVICE_ADDRESSES": json.dumps(keys.group(1).split(", ")),
            "FEDCOMPUTE_OPERATOR_TOKEN": (work / "operator" / "operator-token").read_text().strip(),
        }
        server = f"127.0.0.1:{port}"
        created = subprocess.run(
            [*CLI, "task", "create", "--server", server, "--population", "replicas", "--rounds", "2",
             "--report-goal", "3", "--max-cohort", "3", "--local-epochs", "1"],
            env=task_env, capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        task_id = json.loads(created.stdout)["task_id"]
        fleet = subprocess.run(
            [*CLI, "devices", "simulate", "--server", server, "--population", "replicas", "--count", "4",
             "--max-sleep", "0.2", "--trusted-providers", str(work / "public" / "trusted-providers.json")],
            env=task_env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert fleet.returncode == 0, fleet.stderr
        got = subprocess.run(
            [*CLI, "task", "get", task_id, "--server", server],
            env=task_env,
            capture_output=True,
            text=True,
            check=True,
        )
        task = json.loads(got.stdout)
        assert task["status"] == "TASK_STATUS_COMPLETED", task
        assert task["latest_model_version"] == "3"
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert not [c for c in _children(up.pid) if "fedcompute" in c]  # nothing left behind


def test_replicas_need_a_port_they_can_share() -> None:
    done = subprocess.run([*CLI, "up", "--replicas", "0"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "replicas" in done.stderr.lower()
