"""Operator commands over the typed clients against a running suite."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedcompute.cli import app
from tests.harness import Harness, suite_settings


def test_task_commands(tmp_path: Path) -> None:
    harness = Harness.start(suite_settings(tmp_path / "work", f"sqlite:///{tmp_path / 'db.sqlite'}"))
    env = {
        "FEDCOMPUTE_WORKDIR": str(tmp_path / "work"),
        "FEDCOMPUTE_KEY_SERVICE_ADDRESSES": json.dumps(harness.suite.key_addresses),
    }
    runner = CliRunner(env=env)
    server = harness.suite.server_address
    try:
        created = runner.invoke(
            app,
            ["task", "create", "--server", server, "--population", "cli", "--report-goal", "2", "--max-cohort", "3"],
        )
        assert created.exit_code == 0, created.output
        task_id = json.loads(created.output)["task_id"]
        got = runner.invoke(app, ["task", "get", task_id, "--server", server])
        assert json.loads(got.output)["status"] == "TASK_STATUS_OPEN"
        listed = runner.invoke(app, ["task", "list", "--server", server, "--population", "cli"])
        assert [t["task_id"] for t in json.loads(listed.output)["tasks"]] == [task_id]
        canceled = runner.invoke(app, ["task", "cancel", task_id, "--server", server, "--reason", "done"])
        assert json.loads(canceled.output)["status"] == "TASK_STATUS_CANCELED"
        bad = runner.invoke(app, ["task", "create", "--server", server, "--population", "cli", "--report-goal", "0"])
        assert bad.exit_code == 1
        assert "INVALID_ARGUMENT" in bad.output
        assert "spec.report_goal" in bad.output
        missing = runner.invoke(app, ["task", "get", "task_missing", "--server", server])
        assert missing.exit_code == 1
        assert "NOT_FOUND" in missing.output
    finally:
        harness.stop()


MODELS = """
import torch
from torch import nn


def good():
    return nn.Sequential(nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10)), torch.zeros(4, 64)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x) if x.mean() > 0 else -self.linear(x)


def branchy():
    return Branchy(), torch.rand(4, 64)


def frozen():
    return nn.Sequential(nn.Linear(64, 10)).requires_grad_(False), torch.zeros(4, 64)


def not_a_model():
    return "resnet"
"""


def test_task_create_with_a_users_model(tmp_path: Path) -> None:
    harness = Harness.start(suite_settings(tmp_path / "work", f"sqlite:///{tmp_path / 'db.sqlite'}"))
    models = tmp_path / "team" / "models.py"  # outside any package, never installed
    models.parent.mkdir()
    models.write_text(MODELS)
    env = {
        "FEDCOMPUTE_WORKDIR": str(tmp_path / "work"),
        "FEDCOMPUTE_KEY_SERVICE_ADDRESSES": json.dumps(harness.suite.key_addresses),
    }
    runner = CliRunner(env=env)
    server = harness.suite.server_address
    base = ["task", "create", "--server", server, "--population", "mine", "--report-goal", "2", "--max-cohort", "3"]
    try:
        created = runner.invoke(
            app, [*base, "--model", f"{models}:good", "--optimizer", "adam", "--learning-rate", "0.01"]
        )
        assert created.exit_code == 0, created.output
        task = json.loads(created.stdout)
        assert (task["model_name"], task["parameter_count"]) == ("models", str(64 * 20 + 20 + 20 * 10 + 10))
        assert "1,510 parameters" in created.stderr
        for function, reason in [
            ("branchy", "the model does not export"),
            ("frozen", "the model has no trainable parameters"),
            ("not_a_model", "must return (nn.Module, example input batch"),
            ("missing", "has no function 'missing'"),
        ]:
            refused = runner.invoke(app, [*base, "--model", f"{models}:{function}"])
            assert refused.exit_code == 1, function
            assert "task not created: " in refused.stderr
            assert reason in refused.stderr, refused.stderr
        unknown = runner.invoke(app, [*base, "--model", f"{models}:good", "--loss", "hinge"])
        assert unknown.exit_code == 1
        assert "unknown loss 'hinge'" in unknown.stderr
        listed = runner.invoke(app, ["task", "list", "--server", server, "--population", "mine"])
        assert len(json.loads(listed.stdout)["tasks"]) == 1  # nothing stored for the refused ones
        args = ["task", "evaluate", task["task_id"], "--server", server, "--report-goal", "2", "--max-cohort", "3"]
        evaluation = runner.invoke(app, args)
        assert evaluation.exit_code == 0, evaluation.output
        evaluating = json.loads(evaluation.stdout)
        assert evaluating["spec"]["kind"] == "TASK_KIND_EVALUATION"
        assert (evaluating["model_name"], evaluating["parameter_count"]) == ("models", task["parameter_count"])
        missing = runner.invoke(app, [*args, "--version", "9"])
        assert missing.exit_code == 1
        assert "has no model version 9" in missing.stderr
    finally:
        harness.stop()
