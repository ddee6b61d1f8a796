"""Key services as relying parties and as the ledger: each checks the attestation result, its own policy, the
task's registered access policy, the input set and its release ledger.

The server controls jobs, so it can make the honest attested worker ask for any binding it likes: these tests
mint attestation results for arbitrary bindings (as the verifier would for such jobs) and try every release the
ledger must refuse."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedcompute.attestation.app import verifier_key
from fedcompute.attestation.measure import measure
from fedcompute.attestation.results import Appraisal, ReleaseBinding, mint_result
from fedcompute.clients.dealer import operator_key_clients
from fedcompute.clients.operator import register_policy
from fedcompute.clients.typed import KeyClient
from fedcompute.core import privacy
from fedcompute.core.clock import FakeClock, RandomIds
from fedcompute.core.context import input_set_digest
from fedcompute.core.policy import AccessPolicy, PolicyDp
from fedcompute.core.secrets import key_admin_token
from fedcompute.keys import hpke
from fedcompute.keys import service as service_module
from fedcompute.keys.keystore import KeyStore
from fedcompute.keys.policy import from_message
from fedcompute.keys.release_log import SignedEntry, verify_entries
from fedcompute.keys.trust import load_trusted
from fedcompute.rpc.channels import open_channel
from fedcompute.v1 import common_pb2, key_pb2
from tests.harness import Harness, suite_settings, wait_for


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """These tests play against the key services, which keep no database: the server's backend is SQLite alone
    here (every backend runs the server's own tests)."""
    return f"sqlite:///{tmp_path / 'test.sqlite'}"


ids = RandomIds()


def _clients(harness: Harness) -> list[KeyClient]:
    return [KeyClient(open_channel(a), 10.0) for a in harness.suite.key_addresses]


POLICY = ""  # set per test by _key_id: the registered policy of the "relying" task


def _key_id(harness: Harness) -> str:
    global POLICY
    task = harness.create_task("relying")  # report goal 2: min_clients 2
    POLICY = from_message(task.access_policy.policy).sha256_hex()
    keys = harness.keys.get_public_keys(key_pb2.GetPublicKeysRequest(population_name="relying")).keys
    return keys[0].key_id


def _inputs(*names: str) -> list[tuple[str, str]]:
    return [(f"asg_{n}", f"{ord(n[0]):02x}" * 32) for n in names]


Inputs = list[tuple[str, str]]


def _binding(
    key_id: str, inputs: Inputs | None = None, round_: int = 1, aggregation: str = "agg_x", policy: str = "",
    number: int = 0,
) -> tuple[ReleaseBinding, Inputs]:  # fmt: skip
    inputs = _inputs("a", "b") if inputs is None else inputs
    recipient = hpke.public_bytes(hpke.generate_private_key().public_key())
    digest = input_set_digest(inputs)
    binding = ReleaseBinding(
        recipient, key_id, "task_x", round_, aggregation, "job_x", digest, policy or POLICY, number
    )
    return binding, inputs


def _result(harness: Harness, binding: ReleaseBinding, when: datetime | None = None, **appraisal: Any) -> str:
    """An attestation result signed with the verifier's key, as a (possibly fooled) verifier would issue."""
    key = verifier_key(harness.suite.settings)
    values = Appraisal(measure(), "LOCAL_SOFTWARE", "disabled-since-boot", "fedcompute/aggregator/v1")
    return mint_result(
        key,
        "fedcompute-verifier",
        ["kp-0", "kp-1", "kp-2"],
        replace(values, **appraisal),
        binding.digest(),
        binding.recipient_public_key,
        when or datetime.now(UTC),
        ids.new_id("ar"),
    )


def _release(client: KeyClient, bound: tuple[ReleaseBinding, Inputs], result: str) -> key_pb2.ReleaseKeyShareResponse:
    binding, inputs = bound
    refs = [common_pb2.InputRef(assignment_id=a, envelope_sha256_hex=e) for a, e in inputs]
    return client.release_key_share(
        key_pb2.ReleaseKeyShareRequest(attestation_result=result, inputs=refs, **binding.fields())
    )


def _attempt(harness: Harness, client: KeyClient, bound: tuple[ReleaseBinding, Inputs]) -> grpc.StatusCode:
    try:
        _release(client, bound, _result(harness, bound[0]))
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _denied_everywhere(
    harness: Harness, bound: tuple[ReleaseBinding, Inputs], result: str, problem: str,
    code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED,
) -> None:  # fmt: skip
    for client in _clients(harness):
        with pytest.raises(grpc.RpcError) as info:
            _release(client, bound, result)
        assert info.value.code() == code
        assert problem in (info.value.details() or "")


def test_valid_result_releases_one_sealed_share_per_provider(harness: Harness) -> None:
    bound = _binding(_key_id(harness))
    result = _result(harness, bound[0])
    replies = [_release(c, bound, result) for c in _clients(harness)]
    assert sorted(r.share_index for r in replies) == [1, 2, 3]
    assert all(len(r.encrypted_share) == 32 + 32 + 16 for r in replies)


@pytest.mark.parametrize(
    ("appraisal", "problem"),
    [
        ({"measurement": "sha256:" + "00" * 32}, "measurement"),
        ({"dbgstat": "enabled"}, "debugging"),
        ({"hwmodel": "SOMETHING_ELSE"}, "hardware model"),
    ],
)
def test_results_outside_policy_are_refused_by_every_key_service(
    harness: Harness, appraisal: dict[str, Any], problem: str
) -> None:
    bound = _binding(_key_id(harness))
    _denied_everywhere(harness, bound, _result(harness, bound[0], **appraisal), problem)


def test_expired_replayed_missing_and_misbound_results_are_refused(harness: Harness) -> None:
    bound = _binding(_key_id(harness))
    old = _result(harness, bound[0], when=datetime.now(UTC) - timedelta(minutes=10))
    _denied_everywhere(harness, bound, old, "expired")
    _denied_everywhere(harness, bound, "", "required")
    result = _result(harness, bound[0])
    other = _binding(bound[0].key_id)  # another recipient key, same result
    _denied_everywhere(harness, other, result, "bound to another request")
    client = _clients(harness)[0]
    _release(client, bound, result)
    with pytest.raises(grpc.RpcError) as info:
        _release(client, bound, result)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "replay" in (info.value.details() or "")


def test_ledger_pins_each_round_to_one_input_set_or_disjoint_ones(harness: Harness) -> None:
    key_id = _key_id(harness)
    client = _clients(harness)[1]
    first = _inputs("a", "b", "c")
    assert _attempt(harness, client, _binding(key_id, first)) == grpc.StatusCode.OK
    # A worker that died and retried: the same input set under a fresh aggregation id is allowed again.
    assert _attempt(harness, client, _binding(key_id, first, aggregation="agg_fresh")) == grpc.StatusCode.OK
    # The server's differencing attack: a second input set sharing contributions, under a fresh aggregation id.
    overlapping = _binding(key_id, _inputs("a", "b"), aggregation="agg_other")
    with pytest.raises(grpc.RpcError) as info:
        _release(client, overlapping, _result(harness, overlapping[0]))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "disjoint" in (info.value.details() or "")
    same_envelope = [("asg_z", _inputs("a")[0][1]), *_inputs("y")]  # the same envelope under another assignment
    assert _attempt(harness, client, _binding(key_id, same_envelope, aggregation="agg_3")) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # A retried attempt with other devices only: allowed; another round is its own slot.
    assert _attempt(harness, client, _binding(key_id, _inputs("d", "e"), aggregation="agg_4")) == grpc.StatusCode.OK
    assert _attempt(harness, client, _binding(key_id, first, round_=2)) == grpc.StatusCode.OK


def test_input_sets_below_min_clients_or_not_matching_their_digest_are_refused(harness: Harness) -> None:
    key_id = _key_id(harness)
    lone = _binding(key_id, _inputs("a"))  # the server's "input set of one upload"
    _denied_everywhere(harness, lone, _result(harness, lone[0]), "needs at least 2")
    binding, _ = _binding(key_id, _inputs("a", "b"))
    lying = (binding, _inputs("c", "d"))  # the list does not hash to the bound digest
    _denied_everywhere(harness, lying, _result(harness, binding), "do not hash", grpc.StatusCode.INVALID_ARGUMENT)
    twice = [("asg_a", "aa" * 32), ("asg_a", "bb" * 32)]
    bound = _binding(key_id, twice)
    _denied_everywhere(harness, bound, _result(harness, bound[0]), "twice", grpc.StatusCode.INVALID_ARGUMENT)


def test_unregistered_policies_and_measurements_outside_the_policy_are_refused(harness: Harness) -> None:
    key_id = _key_id(harness)
    made_up = _binding(key_id, policy="ee" * 32)
    _denied_everywhere(
        harness, made_up, _result(harness, made_up[0]), "not registered", grpc.StatusCode.FAILED_PRECONDITION
    )
    settings = harness.suite.settings
    narrow = AccessPolicy("narrow", "relying", ("sha256:" + "11" * 32,), 2, None, plan_sha256_hex="cd" * 32)
    signed = register_policy(
        narrow, operator_key_clients(settings, key_admin_token(settings)),
        load_trusted(settings.trusted_providers_path()), settings.threshold,
    )  # fmt: skip
    assert len(signed.signatures) == 3
    bound = _binding(key_id, policy=narrow.sha256_hex())  # the worker's real measurement, not the policy's
    _denied_everywhere(harness, bound, _result(harness, bound[0]), "access policy allows")


def _dp_policy(harness: Harness, policy_id: str, budget: float, plan_sha256_hex: str) -> AccessPolicy:
    """A DP access policy of population "relying" (z 1, C 2, min 2 clients, ε budget ``budget``), registered with
    every key service as the operator does."""
    settings = harness.suite.settings
    dp = PolicyDp(1.0, 2.0, 2, epsilon=budget, delta=1e-5, accountant="rdp", assumed_population_size=10)
    policy = AccessPolicy(
        policy_id, "relying", tuple(settings.allowed_measurements), 2, dp, plan_sha256_hex=plan_sha256_hex
    )
    admins = operator_key_clients(settings, key_admin_token(settings))
    register_policy(policy, admins, load_trusted(settings.trusted_providers_path()), settings.threshold)
    return policy


def test_dp_budget_is_enforced_by_each_key_service(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each provider charges its own ledger and refuses the release that would pass ε. The accountant (0.1-0.3 s a
    count) runs before the provider's store lock, never under it: every release of the provider waits on that lock."""
    under_lock = threading.local()
    calls: list[bool] = []
    mutate, accountant = KeyStore.mutate, privacy.epsilon

    @contextmanager
    def watched_mutate(self: KeyStore, then: Callable[[], object] | None = None) -> Iterator[Any]:
        under_lock.held = True
        try:
            with mutate(self, then) as state:
                yield state
        finally:
            under_lock.held = False

    def watched_epsilon(*args: Any) -> float:
        calls.append(getattr(under_lock, "held", False))
        return accountant(*args)

    monkeypatch.setattr(KeyStore, "mutate", watched_mutate)
    monkeypatch.setattr(service_module, "epsilon", watched_epsilon)
    service_module._epsilon_cached.cache_clear()  # another test may have computed these counts in this process
    key_id = _key_id(harness)
    policy = _dp_policy(harness, "tight", 1.1, "cd" * 32)
    client = _clients(harness)[0]
    codes = [
        _attempt(harness, client, _binding(key_id, _inputs(a, b), round_=r, policy=policy.sha256_hex(), number=r))
        for r, (a, b) in enumerate([("a", "b"), ("c", "d"), ("e", "f"), ("g", "h"), ("i", "j"), ("k", "l")], start=1)
    ]
    assert codes[0] == grpc.StatusCode.OK
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert codes.index(grpc.StatusCode.RESOURCE_EXHAUSTED) == codes.count(grpc.StatusCode.OK)  # none after
    log = client.get_release_log(key_pb2.GetReleaseLogRequest())
    pinned = load_trusted(harness.suite.settings.trusted_providers_path())[log.provider_id]
    bodies = verify_entries([SignedEntry(e.body, e.signature) for e in log.entries], log.provider_id, pinned)
    charged = [b for b in bodies if b["policy_sha256"] == policy.sha256_hex()]
    assert len(charged) == codes.count(grpc.StatusCode.OK)
    assert all(b["epsilon_after"] <= 1.1 for b in charged)
    assert [b["releases_charged"] for b in charged] == list(range(1, len(charged) + 1))
    assert calls  # the accountant ran for this policy's counts
    assert not any(calls)  # each of them before the lock


def test_unknown_keys_are_not_found(harness: Harness) -> None:
    _key_id(harness)
    bound = _binding("k_missing")
    with pytest.raises(grpc.RpcError) as info:
        _release(_clients(harness)[0], bound, _result(harness, bound[0]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_shares_are_destroyed_after_their_destruction_time(tmp_path: Path, database_url: str) -> None:
    clock = FakeClock(datetime.now(UTC))
    settings = suite_settings(
        tmp_path / "w", database_url, key_lifetime_s=3600, key_destroy_after_s=60, key_rotate_before_s=600
    )
    from fedcompute.suite import start_suite

    suite = start_suite(settings, clock=clock, aggregator=False)
    harness = Harness.attach(suite)
    try:
        bound = _binding(_key_id(harness))
        binding = bound[0]
        request = key_pb2.GetPublicKeysRequest(population_name="relying")
        clock.advance(timedelta(seconds=3600 - 600 + 1))  # inside the rotation window: the next key is published
        wait_for(lambda: len(harness.keys.get_public_keys(request).keys) == 2, 30, "the rotated key")
        first, second = sorted(harness.keys.get_public_keys(request).keys, key=lambda k: k.expiration_time_unix)
        assert first.key_id == binding.key_id
        assert second.expiration_time_unix > first.expiration_time_unix
        clock.advance(timedelta(seconds=600 + 61))  # past the first key's destruction time
        for address in suite.key_addresses:
            with pytest.raises(grpc.RpcError) as info:
                _release(KeyClient(open_channel(address), 10.0), bound, _result(harness, binding, when=clock.now()))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "destroyed" in (info.value.details() or "")
        for i in range(3):
            stored = json.loads((tmp_path / "w" / "keys" / f"kp-{i}" / "keyset.json").read_text())
            key = stored["keys"][binding.key_id]  # the dealer may have rotated in a new key meanwhile
            assert key["destroyed"] is True
            assert key["sealed_share_hex"] == ""
    finally:
        harness.stop()


class _CountingKeys(KeyClient):
    """A real key-service client that counts the dealer's look-ups of a population's keys."""

    asked = 0

    def get_public_keys(self, request: key_pb2.GetPublicKeysRequest) -> key_pb2.GetPublicKeysResponse:
        _CountingKeys.asked += 1
        return super().get_public_keys(request)


def test_the_dealer_rechecks_a_keyed_population_at_the_housekeeping_interval(tmp_path: Path, database_url: str) -> None:
    """A new population gets its key on the dealer's first pass; once keyed, the dealer does not ask the key
    services about it again until the recheck interval has passed (by the dealer's clock), then asks once and
    makes no new key (it lives far longer than the rotation lead)."""
    from fedcompute.clients.dealer import KeyDealer
    from fedcompute.suite import start_suite

    clock = FakeClock(datetime.now(UTC))
    settings = suite_settings(tmp_path / "w", database_url)
    harness = Harness.attach(start_suite(settings, clock=clock, aggregator=False))
    try:
        s = harness.suite.settings
        token = key_admin_token(s)
        providers: list[KeyClient] = [_CountingKeys(open_channel(a), 10.0, token) for a in s.key_service_addresses]
        dealer = KeyDealer(
            providers, load_trusted(s.trusted_providers_path()), s.threshold, clock, s.key_lifetime_s,
            s.key_destroy_after_s, s.key_rotate_before_s, lambda: {"dealt"}, recheck_s=30,
        )  # fmt: skip
        assert dealer.run_once() == 1  # a new population: a ceremony at once
        keys = harness.keys.get_public_keys(key_pb2.GetPublicKeysRequest(population_name="dealt")).keys
        assert len(keys) == 1
        asked = _CountingKeys.asked
        assert [dealer.run_once() for _ in range(5)] == [0] * 5
        assert _CountingKeys.asked == asked  # keyed: not asked again within the interval
        clock.advance(timedelta(seconds=31))
        assert dealer.run_once() == 0
        assert _CountingKeys.asked == asked + 1  # asked once (the first provider answered), no new key
        assert harness.keys.get_public_keys(key_pb2.GetPublicKeysRequest(population_name="dealt")).keys == keys
    finally:
        harness.stop()


def test_a_binding_the_digest_cannot_encode_is_invalid_argument_at_the_key_services_and_the_verifier(
    harness: Harness,
) -> None:
    """A negative round or a field over 65,535 bytes cannot be put in the binding's digest (a 64-bit unsigned round,
    16-bit lengths): refused as INVALID_ARGUMENT naming the field, not failed as an internal error (found by a
    review, 2026-12-02), by every key service and by the verifier alike."""
    from fedcompute.clients.typed import VerifierClient
    from fedcompute.v1 import verifier_pb2

    binding, inputs = _binding(_key_id(harness), _inputs("a", "b"))
    verifier = VerifierClient(open_channel(harness.suite.settings.verifier_address), 10.0)
    for field, value, problem in (("round", -1, "must be 0 or more"), ("aggregation_id", "a" * 70_000, "65,535")):
        odd = {**binding.fields(), field: value}
        for client in _clients(harness):
            with pytest.raises(grpc.RpcError) as info:
                client.release_key_share(key_pb2.ReleaseKeyShareRequest(attestation_result="x", **odd))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert problem in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            verifier.attest(verifier_pb2.AttestRequest(evidence_format="fedcompute.local-eat.v1", evidence="x", **odd))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in (info.value.details() or "")
    assert len(inputs) == 2


def test_an_attempt_is_charged_once_and_another_attempt_over_the_same_input_set_again(harness: Harness) -> None:
    """Under DP each aggregation attempt yields one output: one attempt (its recipient key, which the attestation
    result binds) asking again for the same input set, for its other key id in a round that spans a key rotation
    or after a lost answer, is not charged again; another attempt over the same input set (a retried or replayed
    job, noised afresh) is charged as the release it is (a review, 2026-12-02, found the first charged twice once
    every repeat was charged)."""
    key_id = _key_id(harness)
    policy = _dp_policy(harness, "attempts", 50.0, "ef" * 32)
    client = _clients(harness)[2]
    first, inputs = _binding(key_id, policy=policy.sha256_hex(), number=1)
    for _ in range(2):  # the same attempt twice: a fresh attestation result each time, the same recipient key
        _release(client, (first, inputs), _result(harness, first))
    another = replace(
        first, recipient_public_key=hpke.public_bytes(hpke.generate_private_key().public_key()), release_number=2
    )
    _release(client, (another, inputs), _result(harness, another))
    log = client.get_release_log(key_pb2.GetReleaseLogRequest())
    bodies = [json.loads(e.body) for e in log.entries]
    mine = [b for b in bodies if b["policy_sha256"] == policy.sha256_hex()]
    assert [(b["repeat"], b["releases_charged"]) for b in mine] == [(False, 1), (True, 1), (True, 2)]


def test_an_input_list_whose_ids_hold_the_digests_separators_is_refused(harness: Harness) -> None:
    """The server chooses assignment ids. One holding NUL and newlines and other inputs made two different,
    overlapping lists hash to one digest (the encoding ``id NUL sha NL`` has no lengths): released once for list A,
    the key services took list B for the same input set released again, so contributions O1, O2 went into two
    released aggregates, past the rule of one input set per round or disjoint ones (found by review, 2026-12-02).
    Ids are now 1-128 of ``[A-Za-z0-9_-]`` and hashes 64 lowercase hex wherever the digest is computed: list B is
    INVALID_ARGUMENT at every key service, and the worker refuses it before asking."""
    from fedcompute.aggregator.worker import _input_set_problem

    def unchecked_digest(pairs: Inputs) -> str:  # the digest's encoding, without the check
        digest = hashlib.sha256(b"fedcompute/input-set/v1\x00")
        for assignment_id, blob_sha in sorted(pairs):
            digest.update(f"{assignment_id}\x00{blob_sha}\n".encode())
        return digest.hexdigest()

    hp, ht, hq, ho1, ho2 = (f"{i:02x}" * 32 for i in range(1, 6))
    a_list = [("asg_b", hp), ("asg_c", ht), ("asg_d", hq), ("asg_x", ho1), ("asg_y", ho2)]
    b_list = [(f"asg_b\x00{hp}\nasg_c\x00{ht}\nasg_d", hq), ("asg_x", ho1), ("asg_y", ho2)]
    assert unchecked_digest(a_list) == unchecked_digest(b_list)
    assert unchecked_digest(a_list) == input_set_digest(a_list)
    key_id = _key_id(harness)
    assert _attempt(harness, _clients(harness)[0], _binding(key_id, a_list)) == grpc.StatusCode.OK
    binding, _ = _binding(key_id, a_list, aggregation="agg_other")  # B's digest, as the server would bind it
    _denied_everywhere(
        harness,
        (binding, b_list),
        _result(harness, binding),
        "is not an assignment id",
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "is not an assignment id" in _input_set_problem(b_list, binding.input_set_sha256_hex, 2)
    for odd in ([("asg_a", "AA" * 32)], [("", "aa" * 32)], [("a" * 129, "aa" * 32)]):
        with pytest.raises(ValueError, match="is not an assignment id"):
            input_set_digest(odd)


def test_oversized_release_requests_are_refused_before_they_cost_memory(harness: Harness) -> None:
    """Anyone may send a ReleaseKeyShare, and parsing costs ~30 bytes per byte received before any check: 32 MiB of
    empty inputs took a key service from 80 MB to 2.2 GB (found by review, 2026-12-02). Now a key service takes
    requests of at most 4 MiB (gRPC refuses a larger one, RESOURCE_EXHAUSTED, unparsed), the verifier 1 MiB, and
    a release names at most 40,000 inputs, counted before any is read. Each stays up for the next call."""
    from fedcompute.clients.typed import VerifierClient
    from fedcompute.v1 import verifier_pb2

    key_id = _key_id(harness)
    binding, _ = _binding(key_id)
    client = _clients(harness)[0]
    many = [common_pb2.InputRef()] * 40_001
    with pytest.raises(grpc.RpcError) as info:
        client.release_key_share(
            key_pb2.ReleaseKeyShareRequest(attestation_result="x", inputs=many, **binding.fields())
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 40000 contributions" in (info.value.details() or "")
    huge = [common_pb2.InputRef(assignment_id="a" * 1000)] * 5000  # ~5 MB
    with pytest.raises(grpc.RpcError) as info:
        client.release_key_share(
            key_pb2.ReleaseKeyShareRequest(attestation_result="x", inputs=huge, **binding.fields())
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    verifier = VerifierClient(open_channel(harness.suite.settings.verifier_address), 10.0)
    with pytest.raises(grpc.RpcError) as info:
        verifier.attest(verifier_pb2.AttestRequest(evidence="x" * 2_000_000, **binding.fields()))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _attempt(harness, client, _binding(key_id)) == grpc.StatusCode.OK  # served as before
