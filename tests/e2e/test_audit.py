"""`fedcompute audit` against a real suite: a released round passes; a tampered or truncated release log, and
releases that break the policy (logged by misbehaving providers), are findings and exit 1."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedcompute.cli import app
from fedcompute.clients.audit import audit
from fedcompute.core.policy import AccessPolicy, PolicyDp
from fedcompute.keys.policy import sign, to_message
from fedcompute.keys.release_log import ReleaseLog
from fedcompute.v1 import common_pb2
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, contribute, suite_settings, wait_for

POP = "audited"


def test_audit_passes_on_the_demo_round_and_fails_on_a_tampered_log(tmp_path: Path) -> None:
    work = tmp_path / "work"
    harness = Harness.start(suite_settings(work, f"sqlite:///{tmp_path / 'db.sqlite'}"))
    try:
        task = harness.create_task(POP, report_goal=2, max_cohort=2)
        for _ in range(2):
            contribute(harness, POP)
        wait_for(lambda: harness.task(task.task_id).status == tm.TASK_STATUS_COMPLETED, 60, "the round")
        token = (work / "operator" / "operator-token").read_text().strip()  # `up`'s, registered as an admin
        runner = CliRunner(
            env={"FEDCOMPUTE_WORKDIR": str(work), "FEDCOMPUTE_OPERATOR_TOKEN": token, "FEDCOMPUTE_PLAINTEXT": "true"}
        )
        args = ["audit", "--task", task.task_id, "--server", harness.suite.server_address]
        for address in harness.suite.key_addresses:
            args += ["--key-service", address]
        clean = runner.invoke(app, args)
        assert clean.exit_code == 0, clean.output
        assert "no findings" in clean.output
        # A key service's disk is edited: the input set of its logged release is rewritten.
        log = work / "keys" / "kp-1" / "release-log.jsonl"
        lines = log.read_text().splitlines()
        entry = json.loads(lines[0])
        body = json.loads(base64.b64decode(entry["body"]))
        body["inputs"] = body["inputs"][:1]
        entry["body"] = base64.b64encode(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).decode()
        log.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
        tampered = runner.invoke(app, args)
        assert tampered.exit_code == 1
        assert "kp-1 release log entry 0: signature does not verify" in tampered.output
        # Another provider's log is truncated: only one valid release is left for the round, two are needed.
        (work / "keys" / "kp-0" / "release-log.jsonl").write_text("")
        truncated = runner.invoke(app, args)
        assert truncated.exit_code == 1
        assert "1 key service(s) logged a release under the task's policy, 2 needed" in truncated.output
    finally:
        harness.stop()


def test_audit_finds_overlapping_input_sets_and_overspent_budgets(tmp_path: Path) -> None:
    """Providers that break their own ledger rules (compromised, or a bug) are caught from their signed logs."""
    keys, policy, task = _dp_task(2, 0.9)
    logs = {}
    for provider, key in keys.items():
        log = ReleaseLog(tmp_path / provider / "log.jsonl", key)
        for round_, inputs in [(1, [["a", "1"], ["b", "2"]]), (1, [["b", "2"], ["c", "3"]]), (2, [["d", "4"]])]:
            log.append(
                {
                    "provider_id": provider, "policy_sha256": policy.sha256_hex(), "round": round_,
                    "input_set_sha256": json.dumps(inputs), "inputs": inputs, "epsilon_after": 0.5,
                }
            )  # fmt: skip
        logs[provider] = log.entries()
    versions = [tm.ModelVersion(version=2, round=1), tm.ModelVersion(version=3, round=2)]
    report = audit(task, versions, logs, {p: k.public_key() for p, k in keys.items()}, 2)
    assert not report.ok
    assert any("round 1 was released for two overlapping input sets" in f for f in report.findings)
    assert any("over the budget 0.9" in f for f in report.findings)
    assert [r.providers for r in report.rows] == [("kp-0", "kp-1"), ("kp-0", "kp-1")]


def test_audit_finds_a_key_service_that_granted_a_release_number_twice_or_not_past_its_count(tmp_path: Path) -> None:
    """DP release numbers (docs/protocol.md A.5) from the signed logs, each key service held to what it signed:
    kp-1 grants number 3 to a second attempt and then number 2 below its count; kp-4 grants one attempt's number
    for another round, logs a charge below its number, then entries that name no attempt or no number. The honest
    logs give no finding: an attempt asking again for another key id; a log across the upgrade to entries that
    name their attempt (v1 then v2), the same attempt asking again with its earlier number; and the same attempt
    asking again after a later grant, its first grant unlogged (stopped between saving its count and logging)."""
    keys, policy, task = _dp_task(6, 50.0)
    a, b, c, d, e = ("a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32, "e5" * 32)  # attempts' recipient keys
    # per log, in order: (attempt, None for a v1 entry; number; releases charged; key id; round)
    grants: dict[str, list[tuple[str | None, int | None, int, str, int]]] = {
        "kp-0": [(a, 1, 1, "k_1", 1), (a, 1, 1, "k_2", 1), (b, 3, 3, "k_1", 2)],
        "kp-1": [(a, 1, 1, "k_1", 1), (b, 3, 3, "k_1", 2), (c, 3, 3, "k_1", 3), (d, 2, 2, "k_1", 4)],
        "kp-2": [(b, 3, 3, "k_1", 2)],
        "kp-3": [(None, 0, 3, "k_1", 1), (a, 5, 5, "k_1", 1), (a, 3, 5, "k_1", 1), (d, 7, 7, "k_1", 2),
                 (e, 6, 7, "k_1", 3)],
        "kp-4": [(a, 1, 1, "k_1", 1), (a, 1, 1, "k_1", 2), (b, 2, 1, "k_1", 3), (None, 0, 4, "k_1", 4),
                 (c, None, 5, "k_1", 5)],
        "kp-5": [(a, 1, 1, "k_1", 1), (b, 3, 3, "k_1", 2), (c, 2, 3, "k_1", 3)],  # below its count, not a repeat
    }  # fmt: skip
    logs = {}
    for provider, key in keys.items():
        log = ReleaseLog(tmp_path / provider / "log.jsonl", key)
        for recipient, number, charged, key_id, round_ in grants[provider]:
            inputs = [[f"asg_{round_}", f"{round_}"]]
            fields: dict[str, object] = {
                "v": 1, "provider_id": provider, "policy_sha256": policy.sha256_hex(), "round": round_,
                "key_id": key_id, "input_set_sha256": json.dumps(inputs), "inputs": inputs, "epsilon_after": 0.5,
                "releases_charged": charged,
            }  # fmt: skip
            if recipient is not None:
                fields |= {"v": 2, "recipient": recipient, "job_id": f"job_{round_}", "release_number": number}
            fields["repeat"] = provider == "kp-3" and recipient in (a, e) and number != charged  # its retries
            log.append(fields)
        logs[provider] = log.entries()
    report = audit(task, [], logs, {p: k.public_key() for p, k in keys.items()}, 2)
    assert report.findings == [
        "kp-1: release number 3 granted to two attempts (entry 2)",
        "kp-1: release number 2 granted after number 3, not past its count (entry 3)",
        "kp-4: release number 1 granted to two attempts (entry 1)",
        "kp-4: entry 2 charges 1 releases, fewer than its number 2",
        "kp-4: entry 3 names no attempt, after entries that did",
        "kp-4: entry 4 has no whole release_number, releases_charged or recipient",
        "kp-5: release number 2 granted after number 3, not past its count (entry 2)",
    ]


def test_audit_reports_entries_it_cannot_read_instead_of_failing(tmp_path: Path) -> None:
    """A key service signs entries of the task's policy that the audit cannot read (a round that is no number,
    inputs that are no pairs, a version 2 entry with no attempt): each is a finding, and the readable entries are
    still audited."""
    keys, policy, task = _dp_task(2, 50.0)
    logs = {}
    for provider, key in keys.items():
        log = ReleaseLog(tmp_path / provider / "log.jsonl", key)
        good = {
            "v": 2, "provider_id": provider, "policy_sha256": policy.sha256_hex(), "round": 1, "key_id": "k_1",
            "input_set_sha256": "s1", "inputs": [["asg_1", "1"]], "epsilon_after": 0.5, "releases_charged": 1,
            "repeat": False, "recipient": "a1" * 32, "job_id": "job_1", "release_number": 1,
        }  # fmt: skip
        log.append(good)
        if provider == "kp-1":
            log.append({**good, "round": "two"})
            log.append({**good, "inputs": [["asg_3"]]})
            log.append({k: v for k, v in good.items() if k != "recipient"})
        logs[provider] = log.entries()
    report = audit(task, [tm.ModelVersion(version=2, round=1)], logs, {p: k.public_key() for p, k in keys.items()}, 2)
    assert report.findings == [
        "kp-1 release log entry 1: round is not a whole number",
        "kp-1 release log entry 2: inputs is not a list of [assignment id, envelope sha256] pairs",
        "kp-1 release log entry 3: a version 2 entry names no attempt (recipient)",
    ]
    assert [r.providers for r in report.rows] == [("kp-0", "kp-1")]


def _dp_task(providers: int, budget: float) -> tuple[dict[str, ec.EllipticCurvePrivateKey], AccessPolicy, tm.Task]:
    """Key services' signing keys, a DP access policy of ε ``budget`` (2 of them needed) and a task it governs,
    the policy signed by every one of them."""
    keys = {f"kp-{i}": ec.generate_private_key(ec.SECP256R1()) for i in range(providers)}
    dp = PolicyDp(1.0, 2.0, 2, epsilon=budget, delta=1e-5, accountant="rdp", assumed_population_size=10)
    policy = AccessPolicy("p", POP, ("sha256:" + "aa" * 32,), 2, dp, plan_sha256_hex="cd" * 32)
    signed = common_pb2.SignedAccessPolicy(policy=to_message(policy))
    for provider, key in keys.items():
        signed.signatures.add(provider_id=provider, signature=sign(policy, key))
    return keys, policy, tm.Task(task_id="task_a", access_policy=signed)
