"""End to end over real gRPC: a fleet trains a task to completion, on SQLite and on Postgres."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch

from fedcompute.clients.dataset import non_iid_shards, train_test_split
from fedcompute.clients.demo import task_spec
from fedcompute.clients.device import download
from fedcompute.clients.fleet import Fleet
from fedcompute.clients.training import evaluate
from fedcompute.core import checkpoints, plans
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, suite_settings

ROUNDS = 2
DEVICES = 4


def test_fleet_trains_a_task_to_completion(database_url: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    harness = Harness.start(suite_settings(tmp_path / "work", database_url))
    train, test = train_test_split(seed=1)
    fleet: Fleet | None = None
    try:
        spec = task_spec(DEVICES, ROUNDS, seed=1)
        spec.population_name = "e2e"
        task = harness.suite.create_task(spec)
        harness.wait_for_key("e2e")  # devices that find no key yet would stop (stop_when_no_task)
        shards = non_iid_shards(train, DEVICES, 1)
        fleet = Fleet(harness.suite.server_address, "e2e", shards, 1, harness.trust(), max_sleep_s=0.2)
        fleet.start(stop_when_no_task=True)
        assert fleet.wait(lambda: harness.task(task.task_id).status != tm.TASK_STATUS_OPEN, timeout_s=240)
        final = harness.task(task.task_id)
        assert final.status == tm.TASK_STATUS_COMPLETED, final.status_reason
        assert (final.current_round, final.latest_model_version) == (ROUNDS, ROUNDS + 1)
        versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions
        assert [(v.version, v.round) for v in versions] == [(1, 0), (2, 1), (3, 2)]
        for parent, child in itertools.pairwise(versions):
            assert child.parent_sha256_hex == parent.checkpoint.sha256_hex
            assert child.contributions == spec.report_goal
        plan = plans.parse(download(harness.resources, final.plan))
        accuracy = [
            evaluate(plan, checkpoints.decode(download(harness.resources, v.checkpoint)), test)["accuracy"]
            for v in versions
        ]
        assert accuracy[-1] > 0.6 > accuracy[0]
        iterations = harness.iterations(task.task_id)
        assert [i.status for i in iterations] == [tm.ITERATION_STATUS_COMPLETED] * ROUNDS
        assert all(i.accepted_contributions == spec.report_goal and i.rejected_contributions == 0 for i in iterations)
        for it in iterations:  # the devices' own metrics, aggregated from inside their envelopes
            metrics = {m.name: m.value for m in it.metrics}
            assert set(metrics) == {"loss", "accuracy"}
            assert 0 < metrics["accuracy"] <= 1
            assert metrics["loss"] > 0
            assert it.metric_examples > 0
        assert [r.round for r in final.round_metrics] == [1, 2]  # GetTask shows them per round too
        assert final.round_metrics[0].metrics == iterations[0].metrics
    finally:
        if fleet:
            fleet.stop()
        harness.stop()


def test_demo_command_writes_json_and_plot(tmp_path: Path) -> None:
    """`demo --model` with a model file that is no part of any package (the built-in path: the test above)."""
    out = tmp_path / "out.json"
    plot = tmp_path / "plot.png"
    model = tmp_path / "elsewhere" / "my_model.py"
    model.parent.mkdir()
    model.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n    return nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10)), torch.zeros(4, 64)\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedcompute.cli",
            "demo",
            "--devices",
            "4",
            "--rounds",
            "2",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
            "--plot",
            str(plot),
            "--model",
            f"{model}:build",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [(r["round"], r["model_version"]) for r in result["rounds"]] == [(1, 2), (2, 3)]
    assert all(r["contributions"] == 4 for r in result["rounds"])  # report goal: ceil(0.8 * 4)
    assert 0.0 <= result["final_accuracy"] <= 1.0
    assert result["final_accuracy"] == result["rounds"][-1]["accuracy"]
    assert result["audit_findings"] == []  # `fedcompute audit` of the demo's task: >= t releases per version
    assert (result["model"], result["parameters"]) == ("my_model", 64 * 48 + 48 + 48 * 10 + 10)
    assert all(set(r["device_metrics"]) == {"loss", "accuracy"} for r in result["rounds"])
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "final held-out accuracy" in done.stdout
