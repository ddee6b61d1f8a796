"""`fedcompute audit`: check a task's published model versions against the key services' release logs.

Anyone can run it: the logs and the task are public, and it trusts only the pinned provider keys. For the task's
signed access policy it verifies every provider's log (signatures, hash chain, sequence), then checks that every
published version (round r >= 1) had >= t providers release for round r under that policy, that no round was
released for two overlapping input sets, and that the ε each provider charged stays within the budget
(recomputed with the policy's accountant, not taken from the log). Under DP, where the entries name their attempt
(``v`` 2: recipient key, job and release number), also that each key service granted a number to one attempt only,
each new number past the ones before it and no charge below its number, and that its entries keep naming their
attempt (docs/protocol.md A.4, A.5), as its own signed log tells it. An entry it cannot read is a finding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.clients.typed import KeyClient, TaskManagementClient
from fedcompute.core.policy import AccessPolicy
from fedcompute.core.privacy import epsilon
from fedcompute.keys.policy import UntrustedPolicy, check_signed
from fedcompute.keys.release_log import LogInvalid, SignedEntry, verify_entries
from fedcompute.v1 import key_pb2
from fedcompute.v1 import task_management_pb2 as tm


@dataclass(frozen=True)
class RoundRow:
    round: int
    version: int
    providers: tuple[str, ...]
    input_sets: int
    epsilon: float | None


@dataclass
class AuditReport:
    policy_sha256: str = ""
    rows: list[RoundRow] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def audit(
    task: tm.Task,
    versions: list[tm.ModelVersion],
    logs: Mapping[str, list[SignedEntry]],
    trusted: Mapping[str, ec.EllipticCurvePublicKey],
    threshold: int,
) -> AuditReport:
    report = AuditReport()
    try:
        policy = check_signed(task.access_policy, trusted, threshold)
    except UntrustedPolicy as exc:
        report.findings.append(f"task {task.task_id}: {exc}")
        return report
    report.policy_sha256 = digest = policy.sha256_hex()
    entries: list[dict[str, Any]] = []
    for provider, signed in sorted(logs.items()):
        if provider not in trusted:
            report.findings.append(f"{provider}: not a pinned key service; its log is ignored")
            continue
        try:
            bodies = verify_entries(signed, provider, trusted[provider])
        except LogInvalid as exc:
            report.findings.append(str(exc))
            continue
        for body in bodies:
            if body.get("policy_sha256") != digest:
                continue
            if problem := _malformed(body):  # signed, so its key service's doing: a finding, not a crash here
                report.findings.append(f"{provider} release log entry {body['seq']}: {problem}")
            else:
                entries.append(body)
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for body in entries:
        by_round[int(body["round"])].append(body)
    _overlaps(by_round, report)
    if policy.dp:
        _numbers(entries, report)
    spent = _budget(policy, entries, report)
    for version in versions:
        if version.version <= 1:
            continue  # the initial model was released by nobody
        released = by_round.get(version.round, [])
        providers = tuple(sorted({b["provider_id"] for b in released}))
        if len(providers) < threshold:
            report.findings.append(
                f"version {version.version} (round {version.round}): {len(providers)} key service(s) logged a "
                f"release under the task's policy, {threshold} needed"
            )
        sets = len({b["input_set_sha256"] for b in released})
        eps = max((b["epsilon_after"] for b in released), default=0.0) if policy.dp else None
        report.rows.append(RoundRow(version.round, version.version, providers, sets, eps))
    if policy.dp and spent > policy.dp.epsilon:
        report.findings.append(f"epsilon spent {spent:.4g} exceeds the policy's budget {policy.dp.epsilon:g}")
    return report


def fetch_and_audit(
    operators: TaskManagementClient,
    key_services: Sequence[KeyClient],
    task_id: str,
    trusted: Mapping[str, ec.EllipticCurvePublicKey],
    threshold: int,
) -> AuditReport:
    """Fetch the task, its versions and every key service's whole release log, then ``audit`` them."""
    task = operators.get_task(tm.GetTaskRequest(task_id=task_id)).task
    versions = list(operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task_id)).versions)
    logs = {}
    for client in key_services:
        reply = client.get_release_log(key_pb2.GetReleaseLogRequest())
        logs[reply.provider_id] = [SignedEntry(e.body, e.signature) for e in reply.entries]
    return audit(task, versions, logs, trusted, threshold)


def _overlaps(by_round: Mapping[int, list[dict[str, Any]]], report: AuditReport) -> None:
    for round_, released in sorted(by_round.items()):
        sets: dict[str, set[str]] = {}
        for body in released:
            sets[body["input_set_sha256"]] = {x for pair in body["inputs"] for x in pair}
        for (a, one), (b, two) in combinations(sorted(sets.items()), 2):
            if one & two:
                report.findings.append(
                    f"round {round_} was released for two overlapping input sets ({a[:12]}…, {b[:12]}…)"
                )


def _numbers(entries: list[dict[str, Any]], report: AuditReport) -> None:
    """Each key service's DP release numbers (docs/protocol.md A.5) under the policy, in its log's order, from the
    entries that name their attempt (recipient key; the round and input set it was bound to): a number is granted
    to one attempt only (the same attempt may ask again: another key id, a retried call), a number first seen is
    past every number before it (unless the entry is a repeat charging more than its number: the same attempt,
    its first grant unlogged), and no entry says fewer releases charged than the number it names. Entries of
    version 1 name no attempt: their counts are taken as numbers granted to someone, and such an entry after one
    that named its attempt is a finding. This holds a key service to what it signed in its own log; one that
    lies in its log as well is beyond any log's reach."""
    granted: dict[str, dict[int, tuple[str, object, object] | None]] = defaultdict(dict)  # number -> attempt
    named: set[str] = set()  # providers whose log named its attempts already
    for body in entries:
        provider, seq = body["provider_id"], body["seq"]
        mine = granted[provider]
        if "recipient" not in body:
            if provider in named:
                report.findings.append(f"{provider}: entry {seq} names no attempt, after entries that did")
            if (old := _whole(body.get("releases_charged"))) is not None:
                mine.setdefault(old, None)
            continue
        named.add(provider)
        number, charged, recipient = (
            _whole(body.get("release_number")),
            _whole(body.get("releases_charged")),
            body["recipient"],
        )
        if number is None or charged is None or not isinstance(recipient, str):
            report.findings.append(
                f"{provider}: entry {seq} has no whole release_number, releases_charged or recipient"
            )
            continue
        if charged < number:
            report.findings.append(
                f"{provider}: entry {seq} charges {charged} releases, fewer than its number {number}"
            )
        attempt = (recipient, body.get("round"), body.get("input_set_sha256"))
        if number not in mine:
            # a repeat whose count is above its number is the attempt asking again (another key id) with its first
            # grant unlogged: a key service stopped, or its log not written, after the count was saved leaves that
            if mine and number <= max(mine) and not (charged > number and body.get("repeat") is True):
                report.findings.append(
                    f"{provider}: release number {number} granted after number {max(mine)}, not past its count "
                    f"(entry {seq})"
                )
            mine[number] = attempt
        elif mine[number] is not None and mine[number] != attempt:
            report.findings.append(f"{provider}: release number {number} granted to two attempts (entry {seq})")


def _malformed(body: Mapping[str, Any]) -> str:
    """What in a verified entry of the task's policy the audit cannot read ('' if nothing)."""
    if _whole(body.get("round")) is None:
        return "round is not a whole number"
    if not isinstance(body.get("input_set_sha256"), str):
        return "input_set_sha256 is not a string"
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in inputs
    ):
        return "inputs is not a list of [assignment id, envelope sha256] pairs"
    eps = body.get("epsilon_after", 0.0)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return "epsilon_after is not a number"
    if _whole(body.get("v")) not in (None, 1) and not isinstance(body.get("recipient"), str):
        return f"a version {body['v']} entry names no attempt (recipient)"
    return ""


def _whole(value: object) -> int | None:
    """A count or number as a log entry holds it (a JSON integer, not a boolean), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _budget(policy: AccessPolicy, entries: list[dict[str, Any]], report: AuditReport) -> float:
    """The largest ε any provider charged: from its distinct (round, input set) releases, or the releases it says
    it charged (``releases_charged``: a further attempt over one input set is charged too), whichever is more."""
    if policy.dp is None:
        return 0.0
    dp = policy.dp
    worst = 0.0
    charged: dict[str, set[tuple[int, str]]] = defaultdict(set)
    said: dict[str, int] = defaultdict(int)
    for body in entries:
        charged[body["provider_id"]].add((int(body["round"]), body["input_set_sha256"]))
        numbers = (_whole(body.get("releases_charged")), _whole(body.get("release_number")))  # the number: v2
        said[body["provider_id"]] = max([said[body["provider_id"]], *(n for n in numbers if n is not None)])
    for provider, distinct in sorted(charged.items()):
        releases = max(len(distinct), said[provider])
        eps = epsilon(dp.noise_multiplier, dp.sample_rate, releases, dp.delta, dp.accountant)
        worst = max(worst, eps)
        if eps > dp.epsilon:
            report.findings.append(
                f"{provider}: {releases} releases cost epsilon {eps:.4g}, over the budget {dp.epsilon:g}"
            )
    return worst


def render(report: AuditReport) -> str:
    lines = [f"access policy {report.policy_sha256 or '(unverified)'}"]
    lines.append(f"{'round':>5} {'version':>7} {'released by':<24} {'input sets':>10} {'epsilon':>8}")
    for row in report.rows:
        eps = "-" if row.epsilon is None else f"{row.epsilon:.3f}"
        lines.append(f"{row.round:>5} {row.version:>7} {','.join(row.providers):<24} {row.input_sets:>10} {eps:>8}")
    lines += [f"FINDING: {f}" for f in report.findings] or ["no findings"]
    return "\n".join(lines)
