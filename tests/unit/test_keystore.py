"""A key provider's state files: kept in memory once read, read again only when they changed behind the process's
back; a release appends a line to the journal instead of rewriting the snapshot, and a crash at any point of a
change loses nothing acknowledged and leaves a state that loads."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from fedcompute.keys import keystore
from fedcompute.keys.keystore import KeysetCorrupted, KeysetState, KeyStore, RoundRelease, StoredKey
from tests.fsyncs import watch_fsyncs


def _key(key_id: str) -> StoredKey:
    return StoredKey(key_id, "pop", "ab", 1, "", True, False, 1, 2, 3)


def _release(n: int) -> RoundRelease:
    return RoundRelease(f"{n:064x}", [f"asg_{n}"], [f"{n + 1:064x}"], [f"{n + 2:064x}"])


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keyset.json", os.urandom(32))


def test_the_file_is_parsed_once_while_only_this_process_writes_it(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every release read the whole file three times and again to change it: at 1,000 rounds of 100 devices a
    10 MB parse each (measured: 45-52 ms)."""
    with store.mutate() as state:
        state.policies["p"] = "aa"
    parsed: list[int] = []
    real = KeyStore._load

    def counted(self: KeyStore) -> KeysetState:
        parsed.append(1)
        return real(self)

    monkeypatch.setattr(KeyStore, "_load", counted)
    for n in range(5):
        assert store.read().policies == {"p": "aa"}
        with store.mutate() as state:
            state.releases[f"p|{n}"] = [_release(n)]
            state.charged["p"] = n + 1
    assert parsed == []
    fresh = KeyStore(store._path, os.urandom(32))  # what is on the disk is what this process holds
    assert fresh.read() == store.read()
    assert fresh.read().charged == {"p": 5}


def test_a_file_changed_behind_the_process_is_read_again(store: KeyStore) -> None:
    """Whoever writes the file (an operator restoring a backup, an attacker with the disk: the tests tamper with
    shares so) is what the service acts on, as when it read the file for every request."""
    with store.mutate() as state:
        state.keys["k1"] = _key("k1")
    path = store._path
    time.sleep(0.05)  # past the file system's timestamp tick of the store's write (the module says why)
    data = json.loads(path.read_text())
    data["keys"]["k1"]["sealed_share_hex"] = "cd"  # same length: only the mtime (and content) tell
    path.write_text(json.dumps(data))
    assert store.read().keys["k1"].sealed_share_hex == "cd"
    other = KeyStore(path, os.urandom(32))
    with other.mutate() as state:
        state.keys["k2"] = _key("k2")
    assert set(store.read().keys) == {"k1", "k2"}


def test_a_change_that_raises_is_forgotten(store: KeyStore) -> None:
    with store.mutate() as state:
        state.charged["p"] = 1

    def refused() -> None:
        with store.mutate() as state:
            state.charged["p"] = 2
            state.releases["p|1"] = [_release(1)]
            raise RuntimeError("refused after changing the state")

    with pytest.raises(RuntimeError):
        refused()
    assert store.read().charged == {"p": 1}
    assert store.read().releases == {}
    with store.mutate() as state:  # the next change does not carry it to the disk either
        state.policies["q"] = "bb"
    on_disk = json.loads(store._path.read_text())
    assert (on_disk["charged"], on_disk["releases"], on_disk["policies"]) == ({"p": 1}, {}, {"q": "bb"})


def test_a_read_does_not_change_under_its_caller(store: KeyStore) -> None:
    with store.mutate() as state:
        state.keys["k1"] = _key("k1")
    seen = store.read()
    with store.mutate() as state:
        state.keys["k2"] = _key("k2")
        del state.keys["k1"]
    assert set(seen.keys) == {"k1"}  # iterating it while another thread changes the state cannot fail


def test_the_file_is_written_as_before(store: KeyStore) -> None:
    """The layout is ``dataclasses.asdict``'s (files written by earlier versions read the same)."""
    state = KeysetState(
        keys={"k1": _key("k1")}, policies={"p": "aa"}, releases={"p|1": [_release(1)]}, charged={"p": 1},
        used_result_ids={"jti": 7},
    )  # fmt: skip
    with store.mutate() as current:
        current.keys, current.policies, current.releases = state.keys, state.policies, state.releases
        current.charged, current.used_result_ids = state.charged, state.used_result_ids
    on_disk = json.loads(store._path.read_text())
    assert on_disk.pop("journal_seq") == 0  # the journal entries it holds (none: a change of keys writes it)
    assert on_disk == asdict(state)


def _released(store: KeyStore, n: int) -> None:
    """What a release changes: the round's input set, the policy's charge, the attestation result's id."""
    with store.mutate() as state:
        state.releases[f"p|{n}"] = [_release(n)]
        state.charged["p"] = state.charged.get("p", 0) + 1
        state.used_result_ids[f"jti-{n}"] = 2**31


def _journal(store: KeyStore) -> Path:
    return store._path.with_suffix(".journal")


def _snapshot(store: KeyStore) -> tuple[bytes, int, int]:
    stat = store._path.stat()
    return store._path.read_bytes(), stat.st_ino, stat.st_mtime_ns


def test_a_release_appends_its_round_and_leaves_the_snapshot(store: KeyStore) -> None:
    """Before 2026-12-03 every release rewrote the whole file, ledger and all: at 1,000 rounds of 100 devices
    10 MB (45 ms), at 10,000 rounds 100 MB (517 ms). Now it appends a line the size of its round."""
    with store.mutate() as state:
        state.keys["k1"] = _key("k1")
        state.policies["p"] = "aa"
        for n in range(200):
            state.releases[f"p|{n}"] = [_release(n)]
    before = _snapshot(store)
    for n in range(200, 203):
        _released(store, n)
    assert _snapshot(store) == before  # not rewritten, not replaced
    lines = _journal(store).read_bytes().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
    assert max(len(line) for line in lines) < 1_000 < len(before[0]) // 40  # its round, not the ledger
    fresh = KeyStore(store._path, os.urandom(32))
    assert fresh.read() == store.read()
    assert fresh.read().charged == {"p": 3}
    assert set(fresh.read().used_result_ids) == {"jti-200", "jti-201", "jti-202"}


def test_a_change_of_keys_or_policies_writes_the_snapshot_with_the_journal_folded_in(store: KeyStore) -> None:
    """keyset.json then holds every share and policy as they are (operators and the tamper tests read it)."""
    _released(store, 1)
    with store.mutate() as state:
        state.keys["k1"] = _key("k1")
        del state.used_result_ids["jti-1"]
    on_disk = json.loads(store._path.read_text())
    assert (on_disk["keys"]["k1"]["key_id"], on_disk["charged"], on_disk["journal_seq"]) == ("k1", {"p": 1}, 1)
    assert on_disk["used_result_ids"] == {}
    assert _journal(store).read_bytes() == b""
    _released(store, 2)  # the sequence goes on after the snapshot's
    assert json.loads(_journal(store).read_text())["seq"] == 2
    assert KeyStore(store._path, os.urandom(32)).read() == store.read()


def test_a_line_a_crash_cut_short_is_dropped_and_cut_off(store: KeyStore) -> None:
    """Killed in the middle of an append (its fsync had not returned: the release never left): the next load
    has what was acknowledged, and the next append does not run on from the broken line."""
    _released(store, 1)
    _released(store, 2)
    acknowledged = store.read()
    with _journal(store).open("ab") as journal:
        journal.write(b'{"seq": 3, "releases": {"p|3": [{"input_set_sha')
    after_crash = KeyStore(store._path, os.urandom(32))
    assert after_crash.read() == acknowledged
    _released(after_crash, 3)
    lines = _journal(store).read_bytes().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
    assert KeyStore(store._path, os.urandom(32)).read().charged == {"p": 3}


def test_a_crash_between_the_snapshot_and_emptying_the_journal_counts_nothing_twice(store: KeyStore) -> None:
    """The snapshot holds the journal's entries once it is renamed into place; a crash before the journal is
    emptied leaves them in both. The load skips them by their sequence numbers."""
    _released(store, 1)
    _released(store, 2)
    left = _journal(store).read_bytes()
    with store.mutate() as state:  # folds the journal into the snapshot, then empties it
        state.policies["q"] = "bb"
    _journal(store).write_bytes(left)  # as if the process died before emptying it
    after_crash = KeyStore(store._path, os.urandom(32))
    assert after_crash.read() == store.read()
    assert after_crash.read().charged == {"p": 2}
    _released(after_crash, 3)
    assert KeyStore(store._path, os.urandom(32)).read().charged == {"p": 3}


@pytest.mark.parametrize(
    "damage",
    [
        lambda lines: [lines[0], b"not json", lines[1]],
        lambda lines: [lines[0], lines[2]],  # an entry removed: a gap in the sequence
        lambda lines: [lines[0], b'{"releases": {}}', lines[1]],  # no sequence number
        lambda lines: [lines[0], lines[1], lines[1], lines[2]],  # an entry twice
    ],
)
def test_a_damaged_journal_stops_the_load(store: KeyStore, damage: Any) -> None:
    """Not read as far as it parses: a ledger missing a release would release again, uncharged."""
    for n in range(3):
        _released(store, n)
    lines = _journal(store).read_bytes().splitlines()
    _journal(store).write_bytes(b"\n".join(damage(lines)) + b"\n")
    with pytest.raises(KeysetCorrupted, match="restore it"):
        KeyStore(store._path, os.urandom(32)).read()


def test_the_journal_is_folded_into_the_snapshot_once_it_outgrows_it(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keystore, "JOURNAL_MIN_BYTES", 2_000)
    with store.mutate() as state:
        state.policies["p"] = "aa"
    for n in range(40):
        _released(store, n)
        assert _journal(store).stat().st_size <= max(2_000, store._path.stat().st_size) + 1_000
    assert json.loads(store._path.read_text())["journal_seq"] > 0
    assert KeyStore(store._path, os.urandom(32)).read().charged == {"p": 40}


def test_another_process_appending_is_seen(store: KeyStore) -> None:
    _released(store, 1)
    other = KeyStore(store._path, os.urandom(32))
    _released(other, 2)
    assert store.read().charged == {"p": 2}
    _released(store, 3)
    assert KeyStore(store._path, os.urandom(32)).read().charged == {"p": 3}


_RELEASING = """
import os, sys
from pathlib import Path
from fedcompute.keys.keystore import KeyStore, RoundRelease
store = KeyStore(Path(sys.argv[1]), os.urandom(32))
n = store.read().charged.get("p", 0)
while True:
    with store.mutate() as state:
        if n % 25 == 0:
            state.policies[f"q{n}"] = "aa"  # now and then a snapshot
        state.releases[f"p|{n}"] = [RoundRelease(f"{n:064x}", [f"asg_{i}_{n}" for i in range(100)], [], ["r"])]
        state.charged["p"] = n + 1
    n += 1
    print(n, flush=True)
"""


def test_killed_at_any_moment_a_store_loses_no_acknowledged_release(tmp_path: Path) -> None:
    """A process releasing as fast as it can, killed (SIGKILL) at arbitrary moments, five times: each time the
    files load, every release it had acknowledged is there, and each charge has its input set (one line holds
    both)."""
    path = tmp_path / "keyset.json"
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", _RELEASING, str(path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        acknowledged = 0
        for _ in range(random.randint(20, 120)):
            acknowledged = int(child.stdout.readline())
        child.kill()
        child.wait()
        state = KeyStore(path, os.urandom(32)).read()
        assert state.charged["p"] >= acknowledged
        assert sorted(state.releases) == sorted(f"p|{n}" for n in range(state.charged["p"]))


def test_a_second_writer_waits_and_neither_line_is_lost(store: KeyStore) -> None:
    """One process writes a provider's directory, by design; should a second one run (a restart overlapping the
    old process), it waits for the first's change instead of cutting off its journal line (found by a review:
    the first's line was cut and its number reused, and a replayed result id would then be accepted)."""
    _released(store, 1)
    other = KeyStore(store._path, os.urandom(32))
    done = threading.Event()

    def second() -> None:
        with other.mutate() as state:
            state.used_result_ids["jti-B"] = 2**31
        done.set()

    with store.mutate() as state:
        state.used_result_ids["jti-A"] = 2**31
        writer = threading.Thread(target=second)
        writer.start()
        assert not done.wait(0.3)  # held on the lock while this change is open
    writer.join(10)
    assert done.is_set()
    assert {"jti-A", "jti-B"} <= set(KeyStore(store._path, os.urandom(32)).read().used_result_ids)


def test_the_journals_name_is_made_durable_even_if_its_first_append_failed(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file created by an append that then failed (its fsync raised) exists; the next append, acknowledged,
    still fsyncs the directory (found by a review: it looked at whether the file existed)."""
    with store.mutate() as state:
        state.policies["p"] = "aa"
    real = os.fsync
    failures = [OSError(5, "I/O error")]

    def failing(fd: int) -> None:
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="I/O error"):
        _released(store, 1)
    assert _journal(store).exists()
    synced = watch_fsyncs(monkeypatch)
    _released(store, 2)
    assert synced == [str(_journal(store)), str(store._path.parent)]


def test_a_table_cannot_be_changed_unrecorded(store: KeyStore) -> None:
    with pytest.raises(TypeError), store.mutate() as state:
        state.charged |= {"p": 1}
    with pytest.raises(TypeError), store.mutate() as state:
        state.charged.popitem()
    assert store.read().charged == {}
