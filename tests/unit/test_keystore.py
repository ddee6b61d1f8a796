"""A key provider's state file: kept in memory once read, read again only when it changed behind the process's back."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from fedcompute.keys.keystore import KeysetState, KeyStore, RoundRelease, StoredKey


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
    assert json.loads(store._path.read_text()) == asdict(state)
