"""SQLite durability as Database promises it: a transaction() has fsynced the WAL (after releasing the write
lock, so writers do not queue behind each other's flush) before it returns to its caller; soft_state() does
not wait for the disk. Observed through the real fsync calls on the real WAL file."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from fedcompute.keys.release_log import ReleaseLog, verify_entries
from fedcompute.store.database import Database
from tests.fsyncs import watch_fsyncs


def test_a_durable_commit_fsyncs_the_wal_after_the_write_lock_and_a_soft_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'd.sqlite'}")
    db.migrate()
    wal = str(tmp_path / "d.sqlite-wal")
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        locked = db._writers is not None and db._writers._is_owned()  # type: ignore[attr-defined]
        synced.append((name, locked))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with db.transaction() as s:
        s.execute(text("CREATE TABLE t (x INTEGER)"))
        s.execute(text("INSERT INTO t VALUES (1)"))
        assert synced == []  # nothing flushed while the transaction (and the lock) is held
    assert synced == [(wal, False)]  # flushed once, after the lock was released, before returning
    with db.soft_state() as s:
        s.execute(text("INSERT INTO t VALUES (2)"))
    assert synced == [(wal, False)]  # soft state: no flush of its own
    with db.reading() as s:
        assert s.execute(text("SELECT count(*) FROM t")).scalar() == 2
    db.dispose()


def test_a_stored_blob_is_named_durably_its_directory_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob counted in a committed transaction must still be there after a power cut: its bytes fsynced, then
    renamed in, then the directory that now names it fsynced (and a new ``ab/`` directory's own parent)."""
    from fedcompute.store.blobs import LocalBlobStore

    store = LocalBlobStore(tmp_path / "blobs")
    real_fsync = os.fsync
    synced = watch_fsyncs(monkeypatch)
    digest = store.put(b"first")
    blob_dir = str(tmp_path / "blobs" / "sha256" / digest[:2])
    assert synced[-2:] == [str(tmp_path / "blobs" / "sha256"), blob_dir]  # new ab/: named, then the blob's name
    assert synced[0].startswith(str(tmp_path / "blobs" / "tmp"))  # the bytes first, under the temporary name
    staged = tmp_path / "blobs" / "tmp" / "upload-1"
    staged.write_bytes(b"second")
    synced.clear()
    second = store.put_file(staged)
    assert synced[-1] == str(tmp_path / "blobs" / "sha256" / second[:2])
    assert synced[0] == str(staged)  # its bytes, before the rename
    assert store.get(second) == b"second"
    # a file its writer fsynced after its last write (an upload: the stream's own fsync) is only named durably
    third = tmp_path / "blobs" / "tmp" / "upload-2"
    with third.open("wb") as handle:
        handle.write(b"third")
        handle.flush()
        real_fsync(handle.fileno())
    synced.clear()
    digest = store.put_file(third, synced=True)
    assert str(third) not in synced
    assert synced[-1] == str(tmp_path / "blobs" / "sha256" / digest[:2])
    assert store.get(digest) == b"third"


def test_a_key_services_state_and_the_pinned_providers_are_named_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key service's ledger (shares, policies, the budget each policy spent) and a device's pinned providers:
    a save lost to a power cut would forget a charge, or pin again on first use."""
    from fedcompute.keys.keystore import KeyStore
    from fedcompute.keys.trust import load_trusted, write_trusted

    store = KeyStore(tmp_path / "keys" / "keyset.json", os.urandom(32))
    synced = watch_fsyncs(monkeypatch)
    with store.mutate() as state:  # keys and policies: the snapshot, renamed into place
        state.policies["policy"] = "aa"
    assert synced[-1] == str(tmp_path / "keys")
    assert synced[0].startswith(str(tmp_path / "keys" / ".keyset-"))
    synced.clear()
    with store.mutate() as state:  # a charge: appended to the journal, whose first line creates it
        state.charged["policy"] = 2
    assert synced == [str(tmp_path / "keys" / "keyset.journal"), str(tmp_path / "keys")]
    synced.clear()
    with store.mutate() as state:
        state.charged["policy"] = 3
    assert synced == [str(tmp_path / "keys" / "keyset.journal")]
    assert store.read().charged == {"policy": 3}
    synced.clear()
    pinned = tmp_path / "public" / "trusted-providers.json"
    write_trusted(pinned, {"kp-0": ec.generate_private_key(ec.SECP256R1()).public_key()})
    assert synced[0].startswith(str(tmp_path / "public" / ".trusted-"))
    assert synced[-1] == str(tmp_path / "public")
    assert list(load_trusted(pinned)) == ["kp-0"]
    # the release log: its first entry creates the file, whose name must be durable too; later ones append
    log = ReleaseLog(tmp_path / "log" / "releases.jsonl", ec.generate_private_key(ec.SECP256R1()))
    synced.clear()
    log.append({"round": 1})
    assert synced == [str(tmp_path / "log" / "releases.jsonl"), str(tmp_path / "log")]
    synced.clear()
    log.append({"round": 2})
    assert synced == [str(tmp_path / "log" / "releases.jsonl")]


def test_the_release_log_chains_across_restarts_and_a_failed_append_leaves_no_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends keep the log's tail in memory (an append no longer reads the whole file): a log reopened by a
    restarted provider continues the chain, and an append whose fsync failed is not counted, so the next entry
    is read from what the file holds and the whole log still verifies."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "keys" / "release-log.jsonl"
    first = ReleaseLog(path, key)
    for round_ in range(3):
        first.append({"provider_id": "kp-0", "round": round_})
    restarted = ReleaseLog(path, key)
    assert restarted.append({"provider_id": "kp-0", "round": 3})["seq"] == 3
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        restarted.append({"provider_id": "kp-0", "round": 4})  # written, not known durable: the caller refuses
    monkeypatch.setattr(os, "fsync", real_fsync)
    after = restarted.append({"provider_id": "kp-0", "round": 5})
    bodies = verify_entries(restarted.entries(), "kp-0", key.public_key())
    assert [b["round"] for b in bodies] == [0, 1, 2, 3, 4, 5]  # the file's line 4 is the chain's, not a gap
    assert after["seq"] == 5


def test_generated_secrets_and_signing_keys_appear_whole_and_durably_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verifier's and the platform CA's signing keys, the generated tokens and a key provider's identity are
    made once and kept: written whole under a temporary name and fsynced, linked to their name, the directory
    fsynced. A write that fails half-way (a full disk, a kill) leaves no file under the name, so the next start
    makes a whole one instead of failing on a truncated key (the signing keys were once written in place)."""
    from fedcompute.core.secrets import load_or_create, load_or_create_ec_key
    from fedcompute.keys.identity import load_or_create_identity

    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    key_path = tmp_path / "verifier" / "verifier.pem"
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        load_or_create_ec_key(key_path)
    assert list(key_path.parent.iterdir()) == []  # neither the name nor the temporary file
    monkeypatch.setattr(os, "fsync", real_fsync)

    synced = watch_fsyncs(monkeypatch)
    key = load_or_create_ec_key(key_path)
    assert synced[0].startswith(str(tmp_path / "verifier" / ".verifier.pem-"))  # the bytes, before the name
    assert synced[-1] == str(tmp_path / "verifier")  # the name, after the link
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_ec_key(key_path).private_numbers() == key.private_numbers()  # kept, not made anew
    synced.clear()
    token = load_or_create(tmp_path / "secrets" / "worker-token")
    assert synced[-1] == str(tmp_path / "secrets")
    assert load_or_create(tmp_path / "secrets" / "worker-token") == token
    synced.clear()
    identity = load_or_create_identity(tmp_path / "kp-0", "kp-0")
    assert synced[-1] == str(tmp_path / "kp-0")
    again = load_or_create_identity(tmp_path / "kp-0", "kp-0")
    assert again.signing_key.private_numbers() == identity.signing_key.private_numbers()


# one process of a start-up race: wait for the agreed moment, then make (or find) a provider identity, a token and
# a signing key in the shared directory; print what it got
_CREATOR = """
import hashlib, sys, time
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from fedcompute.core.secrets import load_or_create, load_or_create_ec_key
from fedcompute.keys.identity import load_or_create_identity
folder, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
identity = load_or_create_identity(folder / "kp", "kp-0")
public = identity.signing_key.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
key = load_or_create_ec_key(folder / "ca" / "ca.pem").public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
token = load_or_create(folder / "secrets" / "token")
print(hashlib.sha256(public).hexdigest(), hashlib.sha256(key).hexdigest(), token)
"""


def test_processes_racing_to_create_a_secret_all_get_the_first_writers(tmp_path: Path) -> None:
    """Replicas started together (or a supervisor's restart beside a slow exit) each find no identity, token or
    signing key and make one: every process must end up with the one that was linked first, and that one alone
    is on disk (a second identity would not match the signing key devices and peers pinned)."""
    import subprocess
    import sys
    import time

    start = time.time() + 3.0  # the interpreters' imports are done by then: they make their files together
    racers = [
        subprocess.Popen([sys.executable, "-c", _CREATOR, str(tmp_path), str(start)], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    answers = {racer.communicate(timeout=120)[0] for racer in racers}
    assert all(racer.returncode == 0 for racer in racers)
    assert len(answers) == 1, answers  # one identity, one CA key, one token, whoever won
    for folder in ("kp", "ca", "secrets"):
        assert [p.name for p in (tmp_path / folder).iterdir()] != [], folder
        assert not [p.name for p in (tmp_path / folder).iterdir() if p.name.startswith(".")]  # no temporary files


def test_the_loser_of_a_creation_race_returns_the_winners_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race made certain: another process's identity appears between this one's look and its link."""
    from fedcompute.keys import identity as identity_module

    winner = identity_module.load_or_create_identity(tmp_path, "kp-0")
    looked = [False]
    real_load = identity_module.load_identity

    def not_yet(folder: Path, provider_id: str) -> identity_module.ProviderIdentity | None:
        if not looked[0]:  # the first look happened before the winner linked its file
            looked[0] = True
            return None
        return real_load(folder, provider_id)

    monkeypatch.setattr(identity_module, "load_identity", not_yet)
    loser = identity_module.load_or_create_identity(tmp_path, "kp-0")
    assert looked[0]
    assert loser.signing_key.private_numbers() == winner.signing_key.private_numbers()
    assert loser.wrapping_key.private_bytes_raw() == winner.wrapping_key.private_bytes_raw()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json"]


def test_a_release_log_line_cut_off_by_a_failed_write_is_dropped_by_the_next_append(tmp_path: Path) -> None:
    """A write cut off mid-line (a full disk, a kill) was never acknowledged: the log reads without it, and the
    next append replaces it instead of continuing it (before, every later read of the log failed to parse)."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "keys" / "release-log.jsonl"
    ReleaseLog(path, key).append({"provider_id": "kp-0", "round": 0})
    with path.open("a") as handle:
        handle.write('{"body": "eyJ')  # the start of a second line, no newline
    restarted = ReleaseLog(path, key)
    assert [b["round"] for b in verify_entries(restarted.entries(), "kp-0", key.public_key())] == [0]
    assert restarted.append({"provider_id": "kp-0", "round": 1})["seq"] == 1
    bodies = verify_entries(ReleaseLog(path, key).entries(), "kp-0", key.public_key())
    assert [b["round"] for b in bodies] == [0, 1]
    assert path.read_text().count("\n") == 2


def test_two_processes_appending_to_one_release_log_continue_one_chain(tmp_path: Path) -> None:
    """Two key-service processes on one directory (a rollout overlapping two pods on one volume): each appends
    after the other's entries, so the log stays one chain that verifies. Before, each continued from what it had
    itself last written: the first's next entry repeated sequence number 1, and the log failed verification there."""
    key, pem, path = _log_key_and_path(tmp_path)
    here = ReleaseLog(path, key)
    here.append({"provider_id": "kp-0", "round": 0})  # this process's tail is kept from here on
    other = _SPAWN.Process(target=_append_rounds, args=(str(path), pem, [1, 2]))  # another process, as another pod
    other.start()
    other.join(60)
    assert other.exitcode == 0
    here.append({"provider_id": "kp-0", "round": 3})
    bodies = verify_entries(ReleaseLog(path, key).entries(), "kp-0", key.public_key())
    assert [(b["seq"], b["round"]) for b in bodies] == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_processes_appending_to_one_release_log_at_once_take_turns(tmp_path: Path) -> None:
    """Three processes appending at the same moment (the file's flock): every entry is kept, once, in one chain.
    Without the lock two of them read the same tail and wrote the same sequence number."""
    key, pem, path = _log_key_and_path(tmp_path)
    go = _SPAWN.Event()
    writers = [
        _SPAWN.Process(target=_append_rounds, args=(str(path), pem, list(range(i * 1000, i * 1000 + 40)), go))
        for i in range(3)
    ]
    for writer in writers:
        writer.start()
    go.set()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    bodies = verify_entries(ReleaseLog(path, key).entries(), "kp-0", key.public_key())
    assert [b["seq"] for b in bodies] == list(range(120))
    assert sorted(b["round"] for b in bodies) == sorted(r + i * 1000 for i in range(3) for r in range(40))


def test_a_release_log_replaced_while_an_append_waits_gets_the_entry(tmp_path: Path) -> None:
    """The file renamed over (a restore) while an append waited for its lock: the entry goes to the file the path
    now names, never to the one unlinked (the append had returned, its entry nowhere to be read)."""
    import fcntl
    import threading

    key, _, path = _log_key_and_path(tmp_path)
    log = ReleaseLog(path, key)
    log.append({"provider_id": "kp-0", "round": 0})
    copy = path.with_name("restored.jsonl")
    copy.write_bytes(path.read_bytes())
    holder = os.open(path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another writer holds the log
    appended: list[dict[str, object]] = []
    waiting = threading.Thread(target=lambda: appended.append(log.append({"provider_id": "kp-0", "round": 1})))
    waiting.start()
    time.sleep(0.3)  # the append opens the file and waits for the lock
    os.replace(copy, path)
    os.close(holder)  # the lock goes with it
    waiting.join(30)
    assert [entry["seq"] for entry in appended] == [1]
    bodies = verify_entries(ReleaseLog(path, key).entries(), "kp-0", key.public_key())
    assert [b["round"] for b in bodies] == [0, 1]


_SPAWN = multiprocessing.get_context("spawn")  # other processes, as other pods: nothing shared but the files


def _log_key_and_path(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, bytes, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key, pem, tmp_path / "keys" / "release-log.jsonl"


def _append_rounds(path: str, pem: bytes, rounds: list[int], go: Any = None) -> None:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    log = ReleaseLog(Path(path), key)
    if go is not None:
        go.wait(60)
    for round_ in rounds:
        log.append({"provider_id": "kp-0", "round": round_})
