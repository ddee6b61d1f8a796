"""Operator commands over the typed clients against a running suite."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedcompute.cli import app
from tests.harness import Harness, suite_settings


def _operator_env(harness: Harness, work: Path) -> dict[str, str]:
    """What an operator of an `up` deployment sets: workdir, key services, and the token `up` wrote."""
    return {
        "FEDCOMPUTE_WORKDIR": str(work),
        "FEDCOMPUTE_PLAINTEXT": "true",
        "FEDCOMPUTE_KEY_SERVICE_ADDRESSES": json.dumps(harness.suite.key_addresses),
        "FEDCOMPUTE_OPERATOR_TOKEN": (work / "operator" / "operator-token").read_text().strip(),
    }


def test_task_commands(tmp_path: Path) -> None:
    harness = Harness.start(suite_settings(tmp_path / "work", f"sqlite:///{tmp_path / 'db.sqlite'}"))
    env = _operator_env(harness, tmp_path / "work")
    runner = CliRunner(env=env)
    server = harness.suite.server_address
    try:
        anonymous = CliRunner(env={**env, "FEDCOMPUTE_OPERATOR_TOKEN": ""})
        for args in (["task", "list"], ["task", "get", "task_x"], ["task", "cancel", "task_x"]):
            refused = anonymous.invoke(app, [*args, "--server", server])
            assert refused.exit_code == 1, args
            assert "UNAUTHENTICATED" in refused.stderr
            assert "set FEDCOMPUTE_OPERATOR_TOKEN" in refused.stderr
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
        for status, expected in (("open", []), ("canceled", [task_id])):
            listed = runner.invoke(app, ["task", "list", "--server", server, "--status", status])
            assert [t["task_id"] for t in json.loads(listed.output).get("tasks", [])] == expected
        unknown = runner.invoke(app, ["task", "list", "--server", server, "--status", "paused"])
        assert unknown.exit_code == 2
        assert "unknown status 'paused'" in unknown.output
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
    runner = CliRunner(env=_operator_env(harness, tmp_path / "work"))
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


def test_task_create_takes_a_spec_file_dp_flags_and_the_server_from_the_environment(tmp_path: Path) -> None:
    harness = Harness.start(suite_settings(tmp_path / "work", f"sqlite:///{tmp_path / 'db.sqlite'}"))
    env = {
        **_operator_env(harness, tmp_path / "work"),
        "FEDCOMPUTE_SERVER_ADDRESS": harness.suite.server_address,  # no --server anywhere below
    }
    runner = CliRunner(env=env)
    spec = {
        "population_name": "from-file",
        "model_architecture": "digits-linear-v1",
        "rounds": 3,
        "report_goal": 2,
        "max_cohort": 3,
        "round_deadline_s": 900,
        "dp": {
            "enabled": True,
            "target_epsilon": 6.0,
            "target_delta": 1e-5,
            "assumed_population_size": 500,
            "l2_clip_norm": 1.0,
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    try:
        created = runner.invoke(app, ["task", "create", "--spec", str(tmp_path / "spec.json")])
        assert created.exit_code == 0, created.output
        task = json.loads(created.stdout)
        assert (task["spec"]["population_name"], task["spec"]["round_deadline_s"]) == ("from-file", 900)
        assert task["spec"]["dp"]["target_epsilon"] == 6.0
        assert task["spec"]["dp"]["noise_multiplier"] > 0  # calibrated from the budget
        assert task["access_policy"]["policy"]["dp"]["epsilon"] == 6.0
        flags = ["task", "create", "--population", "flags", "--report-goal", "2", "--max-cohort", "3"]
        with_dp = runner.invoke(app, [*flags, "--dp", "--epsilon", "4", "--population-size", "800", "--clip", "0.5"])
        assert with_dp.exit_code == 0, with_dp.output
        dp = json.loads(with_dp.stdout)["spec"]["dp"]
        assert (dp["target_epsilon"], dp["assumed_population_size"], dp["l2_clip_norm"]) == (4.0, "800", 0.5)
        listed = runner.invoke(app, ["task", "list"])
        assert len(json.loads(listed.stdout)["tasks"]) == 2
        (tmp_path / "bad.json").write_text(json.dumps({**spec, "roundz": 3}))
        bad = runner.invoke(app, ["task", "create", "--spec", str(tmp_path / "bad.json")])
        assert bad.exit_code == 1
        assert "roundz" in bad.stderr
        (tmp_path / "broken.json").write_text("{")
        assert "spec file" in runner.invoke(app, ["task", "create", "--spec", str(tmp_path / "broken.json")]).stderr
        nameless = runner.invoke(app, ["task", "create"])
        assert nameless.exit_code == 1
        assert "name the population" in nameless.stderr
        budget = runner.invoke(app, [*flags, "--dp", "--epsilon", "0"])
        assert budget.exit_code == 1
        assert "spec.dp.target_epsilon" in budget.stderr
        assert len(json.loads(runner.invoke(app, ["task", "list"]).stdout)["tasks"]) == 2
    finally:
        harness.stop()
