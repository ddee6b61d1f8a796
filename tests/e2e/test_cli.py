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
