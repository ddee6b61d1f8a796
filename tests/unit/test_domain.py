"""Task specs, client versions, transitions, checkpoints, FedAvg and the model update rule."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcompute.aggregator.fedavg import StreamingMean
from fedcompute.core import checkpoints, plans
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.loops import PollingLoop
from fedcompute.core.tasks import Hyperparameters, TaskSpec
from fedcompute.core.transitions import check_transition
from fedcompute.core.versions import in_range
from fedcompute.modelupdater.updater import apply_update

GOOD = TaskSpec("pop", "digits-mlp-v1", rounds=3, report_goal=2, max_cohort=3)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"population_name": " "}, "spec.population_name"),
        ({"model_architecture": "resnet-9000"}, "spec.model_architecture"),
        ({"kind": "inference"}, "spec.kind"),
        ({"rounds": 0}, "spec.rounds"),
        ({"report_goal": 0}, "spec.report_goal"),
        ({"max_cohort": 1}, "spec.max_cohort"),
        ({"min_client_version": "1.x"}, "spec.min_client_version"),
        ({"min_client_version": "2", "max_client_version": "1"}, "spec.max_client_version"),
        ({"hyperparameters": Hyperparameters(learning_rate=0)}, "spec.hyperparameters.learning_rate"),
    ],
)
def test_spec_validation_names_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        dataclasses.replace(GOOD, **change).validate()  # type: ignore[arg-type]
    assert info.value.field == field


def test_client_version_ranges() -> None:
    assert in_range("1.4.0", "1.2", "1.10")
    assert not in_range("1.11", "1.2", "1.10")
    assert not in_range("garbage", "", "")
    assert in_range("7", "", "")


def test_transitions_table() -> None:
    check_transition("iteration", "OPEN", "AGGREGATING")
    with pytest.raises(ValueError, match="not allowed"):
        check_transition("iteration", "COMPLETED", "OPEN")


def test_checkpoint_bytes_are_deterministic_and_schema_checked() -> None:
    weights = checkpoints.initial_weights("digits-mlp-v1", seed=3)
    assert checkpoints.encode(weights, {"a": 1, "b": 2}) == checkpoints.encode(weights, {"b": 2, "a": 1})
    assert checkpoints.decode_metadata(checkpoints.encode(weights, {"a": 1})) == {"a": 1}
    plans.check_tensors(plans.parse(GOOD.plan_bytes()).schema(), weights)
    with pytest.raises(ValueError, match="do not match"):
        plans.check_tensors(
            plans.parse(dataclasses.replace(GOOD, model_architecture="digits-linear-v1").plan_bytes()).schema(), weights
        )
    with pytest.raises(ValueError, match="safetensors"):
        checkpoints.decode(b"\x80\x04pickle")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(-10, 10), st.integers(1, 100)), min_size=1, max_size=8))
def test_streaming_mean_is_the_weighted_mean(items: list[tuple[float, int]]) -> None:
    mean = StreamingMean()
    for value, weight in items:
        mean.add({"w": torch.full((3,), value)}, float(weight))
    expected = sum(v * w for v, w in items) / sum(w for _, w in items)
    assert torch.allclose(mean.mean()["w"], torch.full((3,), expected, dtype=torch.float32), atol=1e-5)
    assert mean.count == len(items)


def test_apply_update() -> None:
    base = {"w": torch.ones(2, 2)}
    out = apply_update(base, {"w": torch.full((2, 2), 0.5)}, server_lr=2.0)
    assert torch.equal(out["w"], torch.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="do not match"):
        apply_update(base, {"v": torch.ones(2, 2)}, 1.0)


def test_a_poked_loop_runs_its_next_step_now_not_after_its_interval() -> None:
    """``PollingLoop.poke``: work made in the same process is taken at once; the interval (here an hour) is only
    for work made elsewhere."""
    steps = threading.Semaphore(0)

    def step() -> bool:
        steps.release()
        return False  # no more work: sleep

    loop = PollingLoop("poked", step, 3600.0).start()
    try:
        assert steps.acquire(timeout=10)  # the first pass, at start
        assert not steps.acquire(timeout=0.3)  # then it sleeps its interval
        loop.poke()
        assert steps.acquire(timeout=10)
    finally:
        loop.stop()


def test_seeded_initial_weights_are_the_seeds_even_when_built_on_many_threads_at_once() -> None:
    """The server builds a task's initial model from its seed on the gRPC thread of its CreateTask. The layers
    draw from torch's one global generator, so builds on several threads at once interleaved their draws and each
    got weights of no seed (found 2026-12-02, by a test building two results at once). They now take turns."""
    from concurrent.futures import ThreadPoolExecutor

    expected = {seed: checkpoints.initial_weights("digits-mlp-v1", seed) for seed in range(4)}
    seeds = [i % 4 for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        built = list(pool.map(lambda seed: checkpoints.initial_weights("digits-mlp-v1", seed), seeds))
    for seed, weights in zip(seeds, built, strict=True):
        assert all(torch.equal(weights[name], expected[seed][name]) for name in expected[seed])
