"""Confidential aggregation end to end: key services failing and coming back, a lying key service, a device
refusing an unsigned key, a worker with other code, and a scan for secrets in everything the servers stored."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from sqlalchemy import MetaData, create_engine, select

from fedcompute.clients.device import Device, Participated, Trust
from fedcompute.keys.keystore import KeyStore
from fedcompute.keys.shamir import combine_key
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, contribute, suite_settings, wait_for, zero_update

POPULATION = "secret-pop"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "work"


def _task(harness: Harness, rounds: int = 1, goal: int = 2) -> str:
    return harness.create_task(POPULATION, rounds=rounds, report_goal=goal, max_cohort=goal).task_id


def _round(harness: Harness, task_id: str) -> tm.Iteration:
    return harness.iterations(task_id)[-1]


def test_one_key_service_down_completes_two_down_waits(workdir: Path) -> None:
    settings = suite_settings(workdir, f"sqlite:///{workdir.parent / 'db.sqlite'}", key_service_processes=True)
    harness = Harness.start(settings)
    try:
        task_id = _task(harness, rounds=2)
        kp0, kp1, _ = harness.suite.key_services
        kp0.stop()
        contribute(harness, POPULATION)
        contribute(harness, POPULATION)
        wait_for(lambda: harness.task(task_id).current_round == 2, 60, "round 1 with one key service down")
        kp1.stop()
        contribute(harness, POPULATION)
        contribute(harness, POPULATION)
        wait_for(lambda: "only 1 of 3 key services" in _round(harness, task_id).aggregation_note, 60, "a clear wait")
        assert _round(harness, task_id).status == tm.ITERATION_STATUS_AGGREGATING
        kp1.start()
        wait_for(lambda: harness.task(task_id).status == tm.TASK_STATUS_COMPLETED, 90, "round 2 after kp-1 is back")
        assert [i.accepted_contributions for i in harness.iterations(task_id)] == [2, 2]
    finally:
        harness.stop()


def _kek(workdir: Path, provider: str) -> ChaCha20Poly1305:
    """The demo set-up's KEK file: outside the provider's data directory (workdir/keys/ID)."""
    return ChaCha20Poly1305(bytes.fromhex((workdir / "kek" / f"{provider}.key").read_text()))


def _tamper_share(workdir: Path, provider: str) -> None:
    time.sleep(0.05)  # past the timestamp tick of the provider's last write: its store then sees the change
    folder = workdir / "keys" / provider
    kek = _kek(workdir, provider)
    state = json.loads((folder / "keyset.json").read_text())
    assert state["keys"], f"{provider} holds no share yet"
    for key_id, key in state["keys"].items():
        raw = bytes.fromhex(key["sealed_share_hex"])
        share = kek.decrypt(raw[:12], raw[12:], key_id.encode())
        wrong = bytes([share[0] ^ 0x55]) + share[1:]
        key["sealed_share_hex"] = (raw[:12] + kek.encrypt(raw[:12], wrong, key_id.encode())).hex()
    (folder / "keyset.json").write_text(json.dumps(state))


def _published_by_all(harness: Harness) -> bool:
    """Every provider has imported and activated the population's key (the dealer reaches them one by one)."""
    from fedcompute.clients.typed import KeyClient
    from fedcompute.rpc.channels import open_channel
    from fedcompute.v1 import key_pb2

    request = key_pb2.GetPublicKeysRequest(population_name=POPULATION)
    return all(KeyClient(open_channel(a), 10.0).get_public_keys(request).keys for a in harness.suite.key_addresses)


def test_a_wrong_share_is_detected_and_its_provider_reported(workdir: Path, database_url: str) -> None:
    harness = Harness.start(suite_settings(workdir, database_url))
    try:
        task_id = _task(harness)
        wait_for(lambda: _published_by_all(harness), 30, "kp-2 to hold its share")  # else nothing to tamper with yet
        _tamper_share(workdir, "kp-2")
        contribute(harness, POPULATION)
        contribute(harness, POPULATION)
        wait_for(lambda: harness.task(task_id).status == tm.TASK_STATUS_COMPLETED, 60, "the round")
        note = _round(harness, task_id).aggregation_note
        assert "kp-2" in note
        assert "kp-0" not in note
        assert "kp-1" not in note
    finally:
        harness.stop()


def test_device_refuses_a_key_not_signed_by_its_providers(workdir: Path, database_url: str) -> None:
    harness = Harness.start(suite_settings(workdir, database_url), aggregator=False)
    try:
        task_id = _task(harness)
        impostors = Trust({f"kp-{i}": ec.generate_private_key(ec.SECP256R1()).public_key() for i in range(3)}, 2)
        from fedcompute.clients.dataset import non_iid_shards, train_test_split

        train, _ = train_test_split(0)
        device = Device("d0", non_iid_shards(train, 1, 0)[0], POPULATION, harness.assignments, harness.resources,
                        harness.uploads, impostors)  # fmt: skip
        outcome = device.participate()
        assert isinstance(outcome, Participated)
        assert outcome.refused_key
        assert not outcome.uploaded
        assert _round(harness, task_id).completed_uploads == 0
    finally:
        harness.stop()


def test_worker_with_other_code_gets_no_key(workdir: Path, database_url: str) -> None:
    settings = suite_settings(workdir, database_url, allowed_measurements=["sha256:" + "00" * 32])
    harness = Harness.start(settings)
    try:
        task_id = _task(harness)
        contribute(harness, POPULATION)
        contribute(harness, POPULATION)
        wait_for(lambda: "attestation failed" in _round(harness, task_id).aggregation_note, 60, "a refusal")
        assert "measurement" in _round(harness, task_id).aggregation_note
        for i in range(3):  # nothing was released by any key service (snapshot and journal, as the service reads)
            kek = bytes.fromhex((workdir / "kek" / f"kp-{i}.key").read_text())
            state = KeyStore(workdir / "keys" / f"kp-{i}" / "keyset.json", kek).read()
            assert state.releases == {}
            assert state.used_result_ids == {}
        assert harness.task(task_id).latest_model_version == 1
    finally:
        harness.stop()


def _stored_values(url: str) -> Iterator[bytes]:
    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    yield value if isinstance(value, bytes) else str(value).encode()
    engine.dispose()


def _files(root: Path) -> Iterator[bytes]:
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith(".sock"):
            yield path.read_bytes()


def test_no_plaintext_update_or_key_material_is_stored(workdir: Path, database_url: str) -> None:
    harness = Harness.start(suite_settings(workdir, database_url))
    try:
        task_id = _task(harness)
        payloads = [contribute(harness, POPULATION, zero_update(value=v)) for v in (0.123, 0.456)]
        wait_for(lambda: harness.task(task_id).status == tm.TASK_STATUS_COMPLETED, 60, "the round")
    finally:
        harness.stop()
    shares, public = [], None
    for i in range(3):
        folder = workdir / "keys" / f"kp-{i}"
        kek = _kek(workdir, f"kp-{i}")
        for key_id, key in json.loads((folder / "keyset.json").read_text())["keys"].items():
            raw = bytes.fromhex(key["sealed_share_hex"])
            shares.append((key["share_index"], kek.decrypt(raw[:12], raw[12:], key_id.encode())))
            public = key_id
    assert public is not None
    private = combine_key(shares[:2], 2)
    needles = [private, private.hex().encode(), *(s for _, s in shares), *(s.hex().encode() for _, s in shares)]
    needles += [*payloads, b"num_examples"]
    haystacks = list(_stored_values(database_url)) + list(_files(workdir))
    for needle in needles:
        assert not any(needle in hay for hay in haystacks), "a secret or a plaintext update was stored"


def test_a_copy_of_the_servers_disk_and_database_yields_nothing_to_decrypt(workdir: Path, database_url: str) -> None:
    """The attacker copies the orchestration server's data directory and database after a round: no population key,
    share, KEK, operator credential or plaintext update is there, and the uploaded envelopes are already gone."""
    harness = Harness.start(suite_settings(workdir, database_url))
    try:
        task_id = _task(harness)
        payloads = [contribute(harness, POPULATION, zero_update(value=v)) for v in (0.321, 0.654)]
        wait_for(lambda: harness.task(task_id).status == tm.TASK_STATUS_COMPLETED, 60, "the round")
        server_dir = harness.suite.settings.server_dir()
        wait_for(lambda: not _envelopes(server_dir), 30, "the released uploads to be purged")
    finally:
        harness.stop()
    secrets: list[bytes] = [*payloads, b"num_examples"]
    for i in range(3):
        provider = f"kp-{i}"
        kek_hex = (workdir / "kek" / f"{provider}.key").read_text().strip()
        secrets += [kek_hex.encode(), bytes.fromhex(kek_hex)]
        state = json.loads((workdir / "keys" / provider / "keyset.json").read_text())
        for key_id, key in state["keys"].items():
            raw = bytes.fromhex(key["sealed_share_hex"])
            share = _kek(workdir, provider).decrypt(raw[:12], raw[12:], key_id.encode())
            secrets += [share, share.hex().encode(), raw, key["sealed_share_hex"].encode()]
        identity = json.loads((workdir / "keys" / provider / "identity.json").read_text())
        secrets += [identity["wrapping_key"].encode(), identity["signing_key_pem"].encode()]
    secrets.append((workdir / "operator" / "key-admin-token").read_text().encode())
    secrets.append((workdir / "attest" / "platform-ca.pem").read_bytes())
    haystacks = list(_stored_values(database_url)) + list(_files(server_dir))
    for needle in secrets:
        assert not any(needle in hay for hay in haystacks), "the server's disk or database holds a secret"
    assert not _envelopes(server_dir)
    # Nothing of another component lives in the server's directory at all.
    assert not any(
        p.name in ("identity.json", "keyset.json", "keyset.journal", "platform-ca.pem") for p in server_dir.rglob("*")
    )


def _envelopes(server_dir: Path) -> list[Path]:
    """Blob files that parse as encrypted contributions."""
    from fedcompute.keys.envelope import parse_envelope

    found = []
    for path in (server_dir / "blobs" / "sha256").rglob("*"):
        if path.is_file():
            try:
                parse_envelope(path.read_bytes())
            except Exception:
                continue
            found.append(path)
    return found
