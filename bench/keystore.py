"""A key service's ledger as it grows: the store's part of one key release against writing that release durably.

Every release a provider grants adds the round's input set to its ledger (``keys/keystore.py``, about 10 KB for a
round of 100 devices: their assignment ids and envelope hashes), the policy's charge and the attestation result's
id. Product: what one release does with the store (``keys/service.py KeyService.release``): three reads (the keys
due for destruction, the registered policy, the policy's charged count) and one change, on a ledger already
holding N rounds of 100 devices, N = 100 and 1,000. Limit: the least a store that keeps each change durably must
do: append the change (the same three tables' entries, as JSON) to a file and fsync it. A third row, against
rewriting the whole ledger durably (serialize, write, fsync, rename): what every release did until 2026-12-03,
and what any store keeping the ledger in one file must do. Samples: ``ROUNDS_PER_SAMPLE`` releases each,
interleaved with both limits' as many writes.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path

from bench.common import LoadGenerator, Mode, Result, interleave
from fedcompute.core.files import replace_durably
from fedcompute.keys.keystore import KeyStore, RoundRelease
from fedcompute.keys.keystore import as_json as ledger_json

POLICY = "p" * 64
DEVICES = 100
LEDGERS = (100, 1000)  # rounds already in the ledger
ROUNDS_PER_SAMPLE = 5


def _input_set(devices: int) -> RoundRelease:
    return RoundRelease(
        secrets.token_hex(32), [f"asg_{secrets.token_urlsafe(16)}" for _ in range(devices)],
        [secrets.token_hex(32) for _ in range(devices)], [secrets.token_hex(32)],
    )  # fmt: skip


def _filled(path: Path, rounds: int) -> KeyStore:
    store = KeyStore(path, os.urandom(32))
    with store.mutate() as state:
        state.policies[POLICY] = "00"
        for r in range(rounds):
            state.releases[f"{POLICY}|{r}"] = [_input_set(DEVICES)]
        state.charged[POLICY] = rounds
    return store


def product(store: KeyStore, next_round: list[int]) -> float:
    """Seconds for ``ROUNDS_PER_SAMPLE`` releases' store work, each as ``KeyService.release`` does it."""
    began = time.perf_counter()
    for _ in range(ROUNDS_PER_SAMPLE):
        [k for k in store.read().keys.values() if not k.destroyed]  # destroy_due
        store.read().policies.get(POLICY)  # _registered
        store.read().charged.get(POLICY, 0)  # _warm_epsilon
        release = _input_set(DEVICES)
        with store.mutate() as state:  # ledger.decide's record and charge, the result id
            state.releases[f"{POLICY}|{next_round[0]}"] = [release]
            state.charged[POLICY] = state.charged.get(POLICY, 0) + 1
            state.used_result_ids[secrets.token_hex(8)] = 2**31
        next_round[0] += 1
    return time.perf_counter() - began


def limit(directory: Path) -> float:
    """Seconds to append ``ROUNDS_PER_SAMPLE`` releases' changes to a file, each fsynced, and nothing else."""
    began = time.perf_counter()
    with (directory / "limit.jsonl").open("ab") as handle:
        for n in range(ROUNDS_PER_SAMPLE):
            change = {"releases": {f"{POLICY}|{n}": [vars(_input_set(DEVICES))]}, "charged": {POLICY: n},
                      "used_result_ids": {secrets.token_hex(8): 2**31}}  # fmt: skip
            handle.write((json.dumps(change) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
    return time.perf_counter() - began


def rewrite(store: KeyStore, directory: Path) -> float:
    """Seconds to write the same state ``ROUNDS_PER_SAMPLE`` times as one JSON file, durably, and nothing else."""
    state = store.read()
    began = time.perf_counter()
    for _ in range(ROUNDS_PER_SAMPLE):
        tmp = directory / "limit.tmp"
        with tmp.open("w") as handle:
            handle.write(json.dumps(ledger_json(state)))
            handle.flush()
            os.fsync(handle.fileno())
        replace_durably(tmp, directory / "limit.json")
    return time.perf_counter() - began


def run(mode: Mode, load: LoadGenerator) -> list[Result]:
    results = []
    for rounds in LEDGERS[:1] if mode.quick else LEDGERS:
        with tempfile.TemporaryDirectory(prefix="fedcompute-bench-") as tmp:
            store = _filled(Path(tmp) / "keyset.json", rounds)
            size_mb = (Path(tmp) / "keyset.json").stat().st_size / 1e6
            next_round = [rounds]
            ours, floor, whole = interleave(
                mode.pairs,
                lambda: product(store, next_round),  # noqa: B023 (called before the next iteration)
                lambda: limit(Path(tmp)),
                lambda: rewrite(store, Path(tmp)),  # noqa: B023
            )
        per = ROUNDS_PER_SAMPLE / 1000
        about = f"ledger of {rounds} rounds x {DEVICES} devices ({size_mb:.1f} MB): 3 reads + 1 change"
        results += [
            Result(f"key release, {rounds} rounds", "store per release", "ms", [s / per for s in ours],
                   [s / per for s in floor], lower_is_better=True,
                   notes=f"{about} vs appending the change durably"),
            Result(f"key release, {rounds} rounds", "vs rewriting the ledger", "ms", [s / per for s in ours],
                   [s / per for s in whole], lower_is_better=True,
                   notes=f"{about} vs writing the whole ledger durably (every release until 2026-12-03)"),
        ]  # fmt: skip
    return results
