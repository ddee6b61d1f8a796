"""The orchestration server as the attacker, with its database: it rewrites what it hands to the worker and to
devices, and the attested worker, the key services and the devices refuse. Real suite, real worker process.

Each test edits the server's own tables (the server's powers) and checks that nothing is released: no new model
version, the round's note naming the refusal, and (where the key services decide) no release logged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Connection, create_engine, select, update

from fedcompute.clients.device import Device, Participated, Trust
from fedcompute.clients.typed import KeyClient
from fedcompute.core import plans
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.policy import AccessPolicy, DeviceFloor
from fedcompute.core.programs import check_program
from fedcompute.keys import hpke
from fedcompute.keys.policy import to_message
from fedcompute.keys.statement import UntrustedKey
from fedcompute.rpc.channels import open_channel
from fedcompute.server.assignment import OPEN_TASKS_TTL_S
from fedcompute.store.models import IterationRow, JobRow, TaskRow
from fedcompute.v1 import common_pb2, key_pb2
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, contribute, suite_settings, wait_for

POP = "boundary"


def _dp_task(harness: Harness, goal: int = 2) -> tm.Task:
    config = tm.DpConfig(
        enabled=True, target_epsilon=50.0, target_delta=1e-5, assumed_population_size=1000,
        noise_multiplier=1.5, l2_clip_norm=0.5,
    )  # fmt: skip
    return harness.create_task(POP, report_goal=goal, max_cohort=goal + 1, dp=config)


def _as_server(database_url: str, change: Callable[[Connection], object]) -> None:
    engine = create_engine(database_url)
    with engine.begin() as conn:
        change(conn)
    engine.dispose()


def _replay(conn: Connection, job_id: str, task_id: str) -> None:
    """As the server with its database: put a finished job back in the queue for a worker to release again, its
    task shown open (a claim hands out no job of a task that ended)."""
    conn.execute(
        update(JobRow)
        .where(JobRow.id == job_id)
        .values(status="PENDING", lease_id=None, lease_expiry=None, not_before=None, update_sha256=None)
    )
    conn.execute(update(TaskRow).where(TaskRow.id == task_id).values(status="OPEN"))


def _note(harness: Harness, task_id: str) -> str:
    return harness.iterations(task_id)[-1].aggregation_note


def _releases_logged(harness: Harness) -> int:
    total = 0
    for address in harness.suite.key_addresses:
        total += len(KeyClient(open_channel(address), 10.0).get_release_log(key_pb2.GetReleaseLogRequest()).entries)
    return total


def _rewrite_spec(database_url: str, task_id: str, edit: Callable[[dict[str, Any]], None]) -> None:
    def change(conn: Connection) -> None:
        spec = json.loads(conn.execute(select(TaskRow.spec_json).where(TaskRow.id == task_id)).scalar_one())
        edit(spec)
        conn.execute(update(TaskRow).where(TaskRow.id == task_id).values(spec_json=json.dumps(spec)))

    _as_server(database_url, change)


def test_worker_refuses_a_job_with_dp_switched_off_or_weakened(tmp_path: Path, database_url: str) -> None:
    harness = Harness.start(suite_settings(tmp_path / "w", database_url, max_round_attempts=1))
    try:
        off = _dp_task(harness)
        _rewrite_spec(database_url, off.task_id, lambda spec: spec.update(dp=None))
        for _ in range(2):
            contribute(harness, POP)
        wait_for(lambda: "switches differential privacy off" in _note(harness, off.task_id), 60, "the refusal")
        assert harness.task(off.task_id).latest_model_version == 1
        assert _releases_logged(harness) == 0  # refused before any key service was asked
    finally:
        harness.stop()


def test_worker_refuses_weaker_noise(tmp_path: Path, database_url: str) -> None:
    harness = Harness.start(suite_settings(tmp_path / "w", database_url, max_round_attempts=1))
    try:
        weak = _dp_task(harness)
        _rewrite_spec(database_url, weak.task_id, lambda spec: spec["dp"].update(noise_multiplier=0.01))
        for _ in range(2):
            contribute(harness, POP)
        wait_for(lambda: "dp.noise_multiplier" in _note(harness, weak.task_id), 60, "the refusal")
        assert harness.task(weak.task_id).latest_model_version == 1
        assert _releases_logged(harness) == 0
    finally:
        harness.stop()


def test_an_input_set_below_min_clients_releases_nothing(tmp_path: Path, database_url: str) -> None:
    """The server closes the round after one upload (its report goal rewritten to 1): one device's exact update
    would be the mean. The worker refuses before asking, and the key services would refuse too (grpc tests)."""
    harness = Harness.start(suite_settings(tmp_path / "w", database_url, max_round_attempts=1))
    try:
        task = harness.create_task(POP, report_goal=3, max_cohort=3)
        _as_server(
            database_url,
            lambda conn: conn.execute(
                update(IterationRow).where(IterationRow.task_id == task.task_id).values(report_goal=1)
            ),
        )
        contribute(harness, POP)
        wait_for(lambda: "needs at least 3" in _note(harness, task.task_id), 60, "the refusal")
        assert harness.task(task.task_id).latest_model_version == 1
        assert _releases_logged(harness) == 0
    finally:
        harness.stop()


def _device(harness: Harness, floor: DeviceFloor | None = None) -> Device:
    from fedcompute.clients.dataset import non_iid_shards, train_test_split

    train, _ = train_test_split(seed=0)
    trust = harness.trust()
    return Device(
        "d0", non_iid_shards(train, 1, 0)[0], POP, harness.assignments, harness.resources, harness.uploads,
        Trust(trust.providers, trust.threshold, floor or DeviceFloor()),
    )  # fmt: skip


def _refused(harness: Harness, floor: DeviceFloor | None = None) -> None:
    outcome = _device(harness, floor).participate()
    assert isinstance(outcome, Participated)
    assert outcome.refused_key
    assert not outcome.uploaded


def _relay_policy(database_url: str, task_id: str, signed: common_pb2.SignedAccessPolicy) -> None:
    """The server replaces the policy it relays with the assignment (its check-in path sees the rewrite once its
    open-task cache has aged out)."""
    _as_server(
        database_url,
        lambda conn: conn.execute(
            update(TaskRow).where(TaskRow.id == task_id).values(access_policy=signed.SerializeToString())
        ),
    )
    time.sleep(OPEN_TASKS_TTL_S + 0.2)


def test_devices_refuse_policies_signed_by_too_few_providers_or_below_their_floor(
    tmp_path: Path, database_url: str
) -> None:
    harness = Harness.start(suite_settings(tmp_path / "w", database_url), aggregator=False)
    try:
        task = harness.create_task(POP, report_goal=2, max_cohort=5)
        original = harness.task(task.task_id).access_policy
        _refused(harness, DeviceFloor(require_dp=True))  # below the floor: this device requires DP
        _refused(harness, DeviceFloor(min_clients=3))  # below the floor: releases of 2 are too small for it
        few = common_pb2.SignedAccessPolicy()
        few.CopyFrom(original)
        del few.signatures[1:]  # one provider's signature, two needed
        _relay_policy(database_url, task.task_id, few)
        _refused(harness)
        weakened = common_pb2.SignedAccessPolicy()
        weakened.CopyFrom(original)
        assert len(weakened.signatures) == 3
        weakened.policy.min_clients = 1  # all signatures kept, none of them verifies any more
        _relay_policy(database_url, task.task_id, weakened)
        _refused(harness)
    finally:
        harness.stop()


def test_devices_refuse_a_dp_task_whose_key_no_majority_of_their_pinned_providers_must_release(
    tmp_path: Path, database_url: str
) -> None:
    """Key services number DP releases over each other; that counts every release only if the task's keys are all
    released by majorities of one set of providers. A device that pins providers beyond the key's (2 of 3 dealt
    where it pins 5: another key could be dealt 2 of the other 3) or fewer than the key's (one holder unpinned)
    refuses the DP task; the same key for a task without DP, and a device pinning exactly its holders, are fine."""
    harness = Harness.start(suite_settings(tmp_path / "w", database_url), aggregator=False)
    try:
        task = _dp_task(harness)
        assignment = harness.check_in(POP).task_assignment
        assert assignment.task_id == task.task_id
        trust = harness.trust()
        trust.check(assignment)  # pins the key's three holders: 2 of 3 is a majority
        extra = {f"kp-{i}": ec_public() for i in (8, 9)}
        with pytest.raises(UntrustedKey, match="not more than half of the 5"):
            Trust({**trust.providers, **extra}, trust.threshold).check(assignment)
        two = {p: k for p, k in trust.providers.items() if p != "kp-2"}
        with pytest.raises(UntrustedKey, match="does not pin: kp-2"):
            Trust(two, trust.threshold).check(assignment)
        harness.create_task("plain", report_goal=2, max_cohort=3)
        Trust({**trust.providers, **extra}, trust.threshold).check(harness.check_in("plain").task_assignment)
    finally:
        harness.stop()


def ec_public() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def test_a_replayed_release_of_the_same_input_set_is_noised_afresh_and_charged_again(
    tmp_path: Path, database_url: str
) -> None:
    """The server replays a finished DP job (as if its worker had died, or to learn more): the key services allow
    the same input set again and charge it as another release, and the worker noises it afresh, so the two outputs
    differ and cost two releases of the budget. Before 2026-12-02 a repeat was free and its noise the same, derived
    from the key and the input set: with another clip norm written in the replayed job (adaptive clipping), the two
    outputs combined gave the exact un-noised sum (found by a review)."""
    settings = suite_settings(tmp_path / "w", database_url, upload_retention_s=3600)
    harness = Harness.start(settings)
    try:
        task = _dp_task(harness)
        for _ in range(2):
            contribute(harness, POP)
        wait_for(lambda: harness.task(task.task_id).status == tm.TASK_STATUS_COMPLETED, 60, "the DP round")
        engine = create_engine(database_url)
        with engine.connect() as conn:
            job_id, first = conn.execute(select(JobRow.id, JobRow.update_sha256)).one()
        logged = _releases_logged(harness)
        with engine.begin() as conn:
            _replay(conn, job_id, task.task_id)

        def replayed() -> str | None:
            with engine.connect() as conn:
                return conn.execute(select(JobRow.update_sha256).where(JobRow.id == job_id)).scalar_one()

        wait_for(lambda: replayed() is not None, 60, "the replayed job")
        assert replayed() != first  # noised afresh: nothing to combine the two with to cancel the noise
        engine.dispose()
        assert _releases_logged(harness) > logged
        log = KeyClient(open_channel(harness.suite.key_addresses[0]), 10.0).get_release_log(
            key_pb2.GetReleaseLogRequest()
        )
        bodies = [json.loads(e.body) for e in log.entries]
        assert bodies[-1]["repeat"] is True
        assert bodies[0]["releases_charged"] == 1
        assert bodies[-1]["releases_charged"] == 2  # the repeat is charged as another release
        assert bodies[-1]["epsilon_after"] > bodies[0]["epsilon_after"]
    finally:
        harness.stop()


def _server_credentials(server_dir: Path) -> list[str]:
    """Everything in the server's directory that could be a token: every small text file, whole and stripped."""
    found = {""}
    for path in server_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 4096:
            try:
                found.add(path.read_text().strip())
            except UnicodeDecodeError:
                continue
    return sorted(found)


def test_no_credential_of_the_server_administers_a_key_service(tmp_path: Path) -> None:
    """Key services as their own processes; the attacker presents every secret in the server's directory (its
    worker token, its HMAC secret, ...) and none: importing a key of its choosing, activating it and registering
    a policy all fail, and the key services still publish only the operator's key."""
    settings = suite_settings(tmp_path / "w", f"sqlite:///{tmp_path / 'db.sqlite'}", key_service_processes=True)
    harness = Harness.start(settings, aggregator=False)
    try:
        harness.create_task(POP, report_goal=2, max_cohort=2)
        request = key_pb2.GetPublicKeysRequest(population_name=POP)
        published = harness.keys.get_public_keys(request).keys
        evil = hpke.generate_private_key()
        public = hpke.public_bytes(evil.public_key())
        statement = common_pb2.PublicKey(
            key_id=hpke.key_id_for(public), public_key=public, kem_id=hpke.KEM_ID, kdf_id=hpke.KDF_ID,
            aead_id=hpke.AEAD_ID, activation_time_unix=1, expiration_time_unix=2**40, destruction_time_unix=2**40,
            population_name=POP, threshold=1, provider_ids=["kp-0", "kp-1", "kp-2"],
        )  # fmt: skip
        policy = to_message(AccessPolicy("evil", POP, ("sha256:" + "22" * 32,), 1, None, plan_sha256_hex="cd" * 32))
        tokens = _server_credentials(harness.suite.settings.server_dir())
        assert len(tokens) >= 3  # no token, the worker token, the HMAC secret
        for address in harness.suite.key_addresses:
            for token in tokens:
                client = KeyClient(open_channel(address), 10.0, token)
                calls: list[Callable[[], object]] = [
                    lambda c=client: c.import_key_share(key_pb2.ImportKeyShareRequest(key=statement, share_index=1)),  # type: ignore[misc]
                    lambda c=client: c.activate_key(key_pb2.ActivateKeyRequest(key=statement)),  # type: ignore[misc]
                    lambda c=client: c.register_policy(key_pb2.RegisterPolicyRequest(policy=policy)),  # type: ignore[misc]
                ]
                for call in calls:
                    with pytest.raises(grpc.RpcError) as info:
                        call()
                    assert info.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        assert harness.keys.get_public_keys(request).keys == published
    finally:
        harness.stop()


def _swap_plan(database_url: str, task_id: str, plan: bytes) -> None:
    """The server hands devices a plan of its choosing, with a matching hash (it controls both)."""
    import hashlib

    _as_server(
        database_url,
        lambda conn: conn.execute(
            update(TaskRow).where(TaskRow.id == task_id).values(plan=plan, plan_sha256=hashlib.sha256(plan).hexdigest())
        ),
    )


def test_devices_never_run_code_from_a_plan_the_server_swapped_in(tmp_path: Path) -> None:
    """Pickles, a torch archive, and a well-formed plan whose program carries Python or calls outside ATen: the
    device reports an error and uploads nothing; the planted code never runs."""
    import io
    import os
    import pickle
    import zipfile

    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    database_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    harness = Harness.start(suite_settings(tmp_path / "w", database_url), aggregator=False)
    try:
        task = harness.create_task(POP, report_goal=2, max_cohort=20)
        honest = harness.operators.get_task(tm.GetTaskRequest(task_id=task.task_id)).task
        from fedcompute.clients.device import download

        plan = json.loads(download(harness.resources, honest.plan))
        program = json.loads(plan["program"]["exported_program"])
        with_guards = {**program, "guards_code": [f"__import__('os').system('touch {marker}') == 0"]}
        exec_node = json.loads(json.dumps(program))
        exec_node["graph_module"]["graph"]["nodes"][0]["target"] = "builtins.exec"
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("archive/data/sample_inputs/model.pt", pickle.dumps(Boom()))
        swapped = [
            pickle.dumps(Boom()),
            archive.getvalue(),
            *(
                json.dumps({**plan, "program": {**plan["program"], "exported_program": json.dumps(p)}}).encode()
                for p in (with_guards, exec_node)
            ),
        ]
        for bad in swapped:
            _swap_plan(database_url, task.task_id, bad)
            outcome = _device(harness).participate()
            assert isinstance(outcome, Participated)
            assert outcome.refused_key  # the signed policy names another plan: refused before any download
            assert not outcome.uploaded
            assert not marker.exists()
            programs_checked = plans.parse(bad) if bad.startswith(b"{") else None  # and had it been downloaded:
            if programs_checked is not None:
                with pytest.raises(InvalidArgument):
                    check_program(programs_checked.program)
        assert not marker.exists()
        assert harness.iterations(task.task_id)[0].completed_uploads == 0
    finally:
        harness.stop()


def test_the_worker_refuses_a_plan_the_policy_does_not_name(tmp_path: Path) -> None:
    """The server swaps the plan (and its hash) and feeds the round contributions bound to it: the worker refuses
    the job, naming the policy, and nothing is released."""
    database_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    harness = Harness.start(suite_settings(tmp_path / "w", database_url))
    try:
        task = harness.create_task(POP, report_goal=2, max_cohort=3)
        other = harness.create_task("elsewhere", model_architecture="digits-mlp-v1")
        from fedcompute.clients.device import download

        _swap_plan(database_url, task.task_id, download(harness.resources, harness.task(other.task_id).plan))
        for _ in range(2):
            contribute(harness, POP)  # bound to the swapped plan's hash, as the server's devices would be
        wait_for(
            lambda: any("access policy names" in it.aggregation_note for it in harness.iterations(task.task_id)),
            60,
            "the worker to refuse the job",
        )
        versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions
        assert [v.version for v in versions] == [1]
    finally:
        harness.stop()


def test_a_device_served_a_checkpoint_other_than_the_declared_one_reports_an_error_and_goes_on(
    tmp_path: Path,
) -> None:
    """After a device's honest turn, the server serves, under the model resource its assignments declare, bytes
    other than those declared: longer (cut off as soon as the stream passes the declared size, never held whole),
    or as long but different. Each time the device loads nothing, reports an error (its slot freed at once, not at
    the deadline), uploads nothing and returns. Before 2026-12-02 the integrity error escaped ``participate``
    without a report, ending a simulated fleet's device thread for good, and a download was held whole before its
    size was checked."""
    from fedcompute.clients.device import IntegrityError, download
    from fedcompute.store.models import AssignmentRow, ModelVersionRow

    database_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    harness = Harness.start(suite_settings(tmp_path / "w", database_url), aggregator=False)
    try:
        task = harness.create_task(POP, report_goal=3, max_cohort=20)
        request = tm.ListModelVersionsRequest(task_id=task.task_id)
        declared = harness.operators.list_model_versions(request).versions[0].checkpoint
        outcome = _device(harness).participate()
        assert isinstance(outcome, Participated)
        assert outcome.uploaded  # the same device code, served the declared bytes
        honest = download(harness.resources, declared)
        longer = harness.suite.server.blobs.put(honest + bytes(3 * 1024 * 1024))  # chunks past the declared size
        altered = harness.suite.server.blobs.put(bytes(len(honest)))
        for blob, problem in ((longer, "longer than its declared"), (altered, "does not match its declared")):
            row = ModelVersionRow.task_id == task.task_id
            served = update(ModelVersionRow).where(row).values(checkpoint_sha256=blob)
            _as_server(database_url, partial(Connection.execute, statement=served))
            with pytest.raises(IntegrityError, match=problem):
                download(harness.resources, declared)
            outcome = _device(harness).participate()
            assert isinstance(outcome, Participated)
            assert not outcome.uploaded
        with harness.suite.server.db.reading() as s:
            found = s.execute(select(AssignmentRow.status).where(AssignmentRow.task_id == task.task_id)).scalars()
            statuses = sorted(found)
        assert statuses == ["LOCAL_FAILED", "LOCAL_FAILED", "UPLOADED"]  # reported, not left to time out
    finally:
        harness.stop()


def test_a_release_the_key_services_refuse_for_the_budget_ends_the_task_budget_exhausted_at_once(
    tmp_path: Path, database_url: str
) -> None:
    """The key services charge every aggregation attempt, the server's ledger only published versions: a replayed
    job (or a worker that died after its release) leaves the key services' count ahead. The task's budget here
    covers two releases (ε 0.40 of 0.44; a third would be 0.48). Round 1 is published, then replayed (the key
    services' second charge), so round 2, which the server's own ledger allows, is refused by the key services
    (RESOURCE_EXHAUSTED). The worker says why (FailJob.budget_exhausted) and the task ends BUDGET_EXHAUSTED at once,
    round 2 failed and not reopened. Before 2026-12-02 the round was reopened until its attempts ran out and the
    task ended FAILED: each attempt had devices upload again for a release that could never be made."""
    harness = Harness.start(suite_settings(tmp_path / "w", database_url, upload_retention_s=3600))
    try:
        config = tm.DpConfig(
            enabled=True, target_epsilon=0.44, target_delta=1e-5, assumed_population_size=1000,
            noise_multiplier=0.6, l2_clip_norm=0.5,
        )  # fmt: skip
        task = harness.create_task(POP, rounds=2, report_goal=2, max_cohort=3, dp=config)
        for _ in range(2):
            contribute(harness, POP)
        wait_for(lambda: harness.task(task.task_id).current_round == 2, 60, "round 1 published")
        engine = create_engine(database_url)
        with engine.begin() as conn:
            job_id = conn.execute(select(JobRow.id)).scalar_one()
            _replay(conn, job_id, task.task_id)

        def replayed() -> bool:
            with engine.connect() as conn:
                return conn.execute(select(JobRow.update_sha256).where(JobRow.id == job_id)).scalar_one() is not None

        wait_for(replayed, 60, "the replayed job")  # released again: the key services' second charge
        engine.dispose()
        for _ in range(2):
            contribute(harness, POP)
        wait_for(lambda: harness.task(task.task_id).status != tm.TASK_STATUS_OPEN, 60, "round 2's end")
        final = harness.task(task.task_id)
        assert final.status == tm.TASK_STATUS_BUDGET_EXHAUSTED
        assert "privacy budget" in final.status_reason
        assert "RESOURCE_EXHAUSTED" in final.status_reason
        assert final.latest_model_version == 2  # round 2 was not published
        assert [i.status for i in harness.iterations(task.task_id)] == [
            tm.ITERATION_STATUS_COMPLETED, tm.ITERATION_STATUS_FAILED,
        ]  # fmt: skip
    finally:
        harness.stop()
