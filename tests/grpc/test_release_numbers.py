"""DP release numbers: every key service charges a policy's budget for every release, not only those it took part
in (keys/ledger.py, docs/protocol.md A.5).

The server chooses which key services an attested worker reaches (it deploys the worker and its configuration),
so these tests play it: they mint attestation results for the bindings the honest worker would ask with, numbered
from the counts of the key services the server lets it reach, and try to have more releases made than the budget
allows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedcompute.aggregator.keys import JobKeys, KeyAccess, KeyRefused
from fedcompute.clients.audit import AuditReport
from fedcompute.clients.audit import _numbers as audit_numbers
from fedcompute.clients.dealer import operator_key_clients
from fedcompute.clients.operator import RegistrationFailed
from fedcompute.clients.typed import KeyClient, VerifierClient
from fedcompute.core import privacy
from fedcompute.core.context import input_set_digest
from fedcompute.core.policy import AccessPolicy, PolicyDp
from fedcompute.core.secrets import key_admin_token
from fedcompute.keys import hpke
from fedcompute.keys.keystore import KeyStore
from fedcompute.keys.ledger import MAX_RELEASE_NUMBER
from fedcompute.keys.policy import to_message
from fedcompute.keys.release_log import ReleaseLog
from fedcompute.keys.trust import load_trusted
from fedcompute.rpc.channels import open_channel
from fedcompute.rpc.errors import REFUSAL_KEY, STALE_REFUSAL
from fedcompute.v1 import aggregation_pb2, key_pb2
from tests.grpc.test_key_release import _binding, _clients, _dp_policy, _inputs, _key_id, _release, _result
from tests.harness import Harness, suite_settings


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """These tests play against the key services, which keep no database: the server's backend is SQLite alone
    here (every backend runs the server's own tests)."""
    return f"sqlite:///{tmp_path / 'test.sqlite'}"


DP = PolicyDp(1.0, 2.0, 2, epsilon=1.0, delta=1e-5, accountant="rdp", assumed_population_size=10)  # _dp_policy's


def _budget_for(releases: int) -> float:
    """An ε budget that ``releases`` releases fit and one more does not (_dp_policy's z, q, δ)."""
    fits, over = (
        privacy.epsilon(DP.noise_multiplier, DP.sample_rate, k, DP.delta, "rdp") for k in (releases, releases + 1)
    )
    return (fits + over) / 2


def _count(client: KeyClient, policy: str) -> int:
    return client.get_release_count(key_pb2.GetReleaseCountRequest(policy_sha256_hex=policy)).releases_charged


def _logged(clients: Sequence[KeyClient], policy: str) -> list[dict[str, Any]]:
    """The key services' release log entries under ``policy``, each log in its order, one log after another."""
    bodies = [json.loads(e.body) for c in clients for e in c.get_release_log(key_pb2.GetReleaseLogRequest()).entries]
    return [b for b in bodies if b["policy_sha256"] == policy]


def _number_findings(entries: list[dict[str, Any]]) -> list[str]:
    """What ``fedcompute audit`` finds in these entries' release numbers (clients/audit.py)."""
    report = AuditReport()
    audit_numbers(entries, report)
    return report.findings


def _refusal(exc: grpc.RpcError) -> str:
    trailers: Sequence[tuple[str, str | bytes]] = (
        exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    ) or ()
    return next((str(v) for k, v in trailers if k == REFUSAL_KEY), "")


def test_a_server_that_rotates_the_key_services_gets_no_more_releases_than_the_budget(harness: Harness) -> None:
    """The attack: keep a different key service away from each attempt ({0,1}, {1,2}, {2,0}, ...; 2 of 3 needed).
    Until 2026-12-03 each key service charged only the releases it took part in, two of every three: with a budget
    of 4 releases, 6 attempts were released in all, each key service within its own 4. Numbered, the fifth
    attempt is already refused by both key services it reaches, whichever they are."""
    key_id = _key_id(harness)
    policy = _dp_policy(harness, "rotated", _budget_for(4), "a1" * 32).sha256_hex()
    clients = _clients(harness)
    released, took_part, refusals = 0, [0, 0, 0], []
    for attempt, pair in enumerate([(0, 1), (1, 2), (2, 0)] * 3, start=1):
        reached = [clients[i] for i in pair]
        number = 1 + max(_count(c, policy) for c in reached)  # as the attested worker numbers it (aggregator/keys.py)
        bound = _binding(key_id, _inputs("a", "b"), round_=attempt, policy=policy, number=number)
        result = _result(harness, bound[0])
        shares = 0
        for i, client in zip(pair, reached, strict=True):
            try:
                _release(client, bound, result)
            except grpc.RpcError as exc:
                refusals.append((exc.code(), _refusal(exc)))
                continue
            shares += 1
            took_part[i] += 1
        released += shares >= 2
    assert released == 4
    assert took_part == [3, 3, 2]  # each within 4: the per-provider charge alone would have let two more through
    assert set(refusals) == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "privacy-budget")}
    assert [_count(c, policy) for c in clients] == [4, 4, 3]
    # the signed logs name each grant's attempt and number: an auditor finds every number one attempt's, rising
    entries = _logged(clients, policy)
    assert sorted({b["release_number"] for b in entries}) == [1, 2, 3, 4]
    assert _number_findings(entries) == []


def test_a_number_at_or_below_a_key_services_count_is_stale_and_the_same_attempt_asking_again_is_a_repeat(
    harness: Harness,
) -> None:
    """A key service grants a number only past its count, or the same number again to the same attempt (a retried
    call: not charged again); a lagging one charges the jump; a DP release with no number is invalid."""
    key_id = _key_id(harness)
    policy = _dp_policy(harness, "numbers", 50.0, "b2" * 32).sha256_hex()
    client = _clients(harness)[1]
    jumped = _binding(key_id, _inputs("a", "b"), round_=1, policy=policy, number=3)
    _release(client, jumped, _result(harness, jumped[0]))  # two releases elsewhere first: it charges 3
    assert _count(client, policy) == 3
    for stale in (2, 3):  # another attempt's: at or below the count
        bound = _binding(key_id, _inputs("c", "d"), round_=2, policy=policy, number=stale)
        with pytest.raises(grpc.RpcError) as info:
            _release(client, bound, _result(harness, bound[0]))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _refusal(info.value) == STALE_REFUSAL
        assert "GetReleaseCount" in (info.value.details() or "")
    _release(client, jumped, _result(harness, jumped[0]))  # the same attempt and number: a repeat
    assert _count(client, policy) == 3
    higher = (replace(jumped[0], release_number=5), jumped[1])
    _release(client, higher, _result(harness, higher[0]))  # the same attempt, renumbered past the count: charged
    assert _count(client, policy) == 5
    unnumbered = _binding(key_id, _inputs("e", "f"), round_=3, policy=policy)
    with pytest.raises(grpc.RpcError) as info:
        _release(client, unnumbered, _result(harness, unnumbered[0]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "release_number" in (info.value.details() or "")
    mine = _logged([client], policy)
    assert [b["releases_charged"] for b in mine] == [3, 3, 5]
    assert [b["release_number"] for b in mine] == [3, 3, 5]  # as granted: the repeat's number is the attempt's
    assert len({b["recipient"] for b in mine}) == 1  # one attempt throughout
    assert {b["job_id"] for b in mine} == {jumped[0].job_id}
    with pytest.raises(grpc.RpcError) as info:
        _count(client, "c3" * 32)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # a policy never registered there


def test_dp_releases_of_a_key_no_majority_must_release_are_refused(tmp_path: Path, database_url: str) -> None:
    """With t <= n/2 two disjoint sets of key services could each release and number their releases alike: DP
    releases of such a key are refused; releases without DP are not affected."""
    harness = Harness.start(suite_settings(tmp_path / "w", database_url, key_services=2, threshold=1), aggregator=False)
    try:
        key_id = _key_id(harness)
        with pytest.raises(RegistrationFailed, match=r"t > n/2"):  # the operator's tools refuse such a task
            _dp_policy(harness, "split", 50.0, "d4" * 32)
        settings = harness.suite.settings
        dp = PolicyDp(1.0, 2.0, 2, epsilon=50.0, delta=1e-5, accountant="rdp", assumed_population_size=10)
        split = AccessPolicy("split", "relying", tuple(settings.allowed_measurements), 2, dp, plan_sha256_hex="d4" * 32)
        for admin in operator_key_clients(settings, key_admin_token(settings)):  # an operator going round them
            admin.register_policy(key_pb2.RegisterPolicyRequest(policy=to_message(split)))
        policy = split.sha256_hex()
        client = _clients(harness)[0]
        bound = _binding(key_id, policy=policy, number=1)
        with pytest.raises(grpc.RpcError) as info:
            _release(client, bound, _result(harness, bound[0]))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "t > n/2" in (info.value.details() or "")
        assert _count(client, policy) == 0
        plain = _binding(key_id, round_=2)  # the task's own policy, without DP
        _release(client, plain, _result(harness, plain[0]))
    finally:
        harness.stop()


class _StaleCounts(KeyClient):
    """A real key-service client whose first GetReleaseCount answer is 0: a count read from a key service that
    lags or lies, or altered on the way (unsigned, as counts are)."""

    asked = 0

    def get_release_count(self, request: key_pb2.GetReleaseCountRequest) -> key_pb2.GetReleaseCountResponse:
        self.asked += 1
        reply = super().get_release_count(request)
        return key_pb2.GetReleaseCountResponse(provider_id=reply.provider_id) if self.asked == 1 else reply


@pytest.mark.aggregator  # the suite's launcher: the worker's evidence, signed as the local attester signs it
def test_a_worker_told_stale_counts_is_refused_then_reads_them_again_and_numbers_past_them(harness: Harness) -> None:
    """The worker's side (aggregator/keys.py JobKeys): numbered from counts of 0 after two releases, every key
    service refuses its number as stale; it reads the counts again and asks with 3 under a new attestation result,
    and rebuilds the published key from shares of that one binding."""
    settings = harness.suite.settings
    key_id = _key_id(harness)
    policy = _dp_policy(harness, "worker", 50.0, "e5" * 32).sha256_hex()
    for client in _clients(harness):  # two releases elsewhere
        earlier = _binding(key_id, _inputs("x", "y"), round_=1, policy=policy, number=2)
        _release(client, earlier, _result(harness, earlier[0]))
    providers = [_StaleCounts(open_channel(a), 10.0) for a in harness.suite.key_addresses]
    access = KeyAccess(
        providers=list(providers), trusted=load_trusted(settings.trusted_providers_path()),
        threshold=settings.threshold, verifier=VerifierClient(open_channel(settings.verifier_address), 10.0),
        evidence=harness.suite.launchers[0].evidence,
    )  # fmt: skip
    inputs = _inputs("a", "b")
    job = aggregation_pb2.AggregationJob(
        job_id="job_w", task_id="task_x", round=2, aggregation_id="agg_w", population_name="relying",
        input_set_sha256_hex=input_set_digest(inputs),
    )  # fmt: skip
    keys = JobKeys(access, job, policy, inputs, numbered=True)
    key = keys(key_id)
    published = harness.keys.get_public_keys(key_pb2.GetPublicKeysRequest(population_name="relying")).keys
    assert hpke.public_bytes(key.public_key()) == next(k.public_key for k in published if k.key_id == key_id)
    assert [p.asked for p in providers] == [2, 2, 2]  # read twice: stale, then as they are
    assert [_count(c, policy) for c in _clients(harness)] == [3, 3, 3]
    assert keys(key_id) is key  # obtained once per attempt


def test_a_number_far_past_the_budget_is_refused_for_the_budget_at_the_accountants_usual_cost(
    harness: Harness,
) -> None:
    """Counts travel unsigned, so a worker may ask with any number a count on the way said. Past 10,000 (the most
    releases a policy may have) it is invalid; below, under the PRV accountant, whose grid grows with the count (a
    million releases asks it for 19 GB), the key service reaches the number from its count in doubling steps and
    refuses at the first over the budget, charging nothing."""
    settings = harness.suite.settings
    key_id = _key_id(harness)
    dp = PolicyDp(1.0, 2.0, 2, epsilon=5.0, delta=1e-5, accountant="prv", assumed_population_size=10)
    policy = AccessPolicy("far", "relying", tuple(settings.allowed_measurements), 2, dp, plan_sha256_hex="f6" * 32)
    for admin in operator_key_clients(settings, key_admin_token(settings)):
        admin.register_policy(key_pb2.RegisterPolicyRequest(policy=to_message(policy)))
    client = _clients(harness)[0]
    for number, code in [(10**12, grpc.StatusCode.INVALID_ARGUMENT), (2**64 - 1, grpc.StatusCode.INVALID_ARGUMENT),
                         (MAX_RELEASE_NUMBER, grpc.StatusCode.RESOURCE_EXHAUSTED)]:  # fmt: skip
        bound = _binding(key_id, policy=policy.sha256_hex(), number=number)
        with pytest.raises(grpc.RpcError) as info:
            _release(client, bound, _result(harness, bound[0]))
        assert info.value.code() == code
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert _refusal(info.value) == "privacy-budget"
            assert f"and release {number} more so" in (info.value.details() or "")
        else:
            assert "numbered 1 to 10000" in (info.value.details() or "")
    assert _count(client, policy.sha256_hex()) == 0
    first = _binding(key_id, policy=policy.sha256_hex(), number=1)
    _release(client, first, _result(harness, first[0]))  # the budget is untouched
    assert _count(client, policy.sha256_hex()) == 1


def test_a_worker_whose_policy_no_key_service_holds_is_refused_not_left_retrying(harness: Harness) -> None:
    """Every key service answers GetReleaseCount FAILED_PRECONDITION (the policy was never registered): the job
    fails for good with their reasons, as a refused release would, rather than waiting for key services to come
    back."""
    settings = harness.suite.settings
    key_id = _key_id(harness)
    access = KeyAccess(
        providers=_clients(harness), trusted=load_trusted(settings.trusted_providers_path()),
        threshold=settings.threshold, verifier=VerifierClient(open_channel(settings.verifier_address), 10.0),
        evidence=lambda nonces: "",
    )  # fmt: skip
    keys = JobKeys(access, aggregation_pb2.AggregationJob(population_name="relying"), "c7" * 32, [], numbered=True)
    with pytest.raises(KeyRefused, match="not registered with key service"):
        keys(key_id)


def test_a_grant_is_logged_only_once_the_key_services_count_keeps_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key service whose count cannot be saved (a full disk) releases nothing and logs nothing, so the next
    attempt's grant of the same number is the only one its log shows; one whose log cannot be written after the
    save keeps the charge and releases nothing, and the same attempt asking again is a repeat, logged then. An
    auditor finds nothing in either log (before 2026-12-03 the entry was written first: a failed save left a signed
    grant of a number the count never took, which the next attempt was granted again)."""
    key_id = _key_id(harness)
    policy = _dp_policy(harness, "kept", 50.0, "e5" * 32).sha256_hex()
    client = _clients(harness)[0]

    def full_disk(*_: object) -> None:
        raise OSError(28, "No space left on device")

    unsaved = _binding(key_id, _inputs("a", "b"), round_=1, policy=policy, number=1)
    with monkeypatch.context() as patched:
        patched.setattr(KeyStore, "_save", full_disk)
        with pytest.raises(grpc.RpcError):
            _release(client, unsaved, _result(harness, unsaved[0]))
    assert _count(client, policy) == 0
    granted = _binding(key_id, _inputs("c", "d"), round_=2, policy=policy, number=1)  # another attempt: number 1
    _release(client, granted, _result(harness, granted[0]))
    unlogged = _binding(key_id, _inputs("e", "f"), round_=3, policy=policy, number=2)
    with monkeypatch.context() as patched:
        patched.setattr(ReleaseLog, "append", full_disk)
        with pytest.raises(grpc.RpcError):
            _release(client, unlogged, _result(harness, unlogged[0]))
    assert _count(client, policy) == 2  # charged: the count is saved before the entry is written
    _release(client, unlogged, _result(harness, unlogged[0]))  # the same attempt again: a repeat
    assert _count(client, policy) == 2
    mine = _logged([client], policy)
    assert [(b["round"], b["release_number"], b["releases_charged"]) for b in mine] == [(2, 1, 1), (3, 2, 2)]
    assert _number_findings(mine) == []
