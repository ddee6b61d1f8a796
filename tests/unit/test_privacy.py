"""Accounting: our commands equal Opacus' accountants, agree with Google's dp-accounting PLD, and task budgets
are validated with messages naming the field."""

from __future__ import annotations

import json
from dataclasses import replace

import dp_accounting
import pytest
from opacus.accountants import create_accountant
from typer.testing import CliRunner

from fedcompute.cli import app
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.privacy import DpSpec, calibrate, epsilon

CASES = [(1.0, 0.01, 100, 1e-5), (0.8, 0.8, 5, 1e-3), (0.7, 0.005, 500, 1e-6)]


def _cli(*args: str) -> dict[str, float]:
    result = CliRunner().invoke(app, ["privacy", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("z", "q", "rounds", "delta"), CASES)
@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_epsilon_command_equals_opacus(z: float, q: float, rounds: int, delta: float, name: str) -> None:
    accountant = create_accountant(name)
    for _ in range(rounds):
        accountant.step(noise_multiplier=z, sample_rate=q)
    ours = _cli("epsilon", "--noise-multiplier", str(z), "--sample-rate", str(q), "--rounds", str(rounds),
                "--delta", str(delta), "--accountant", name)["epsilon"]  # fmt: skip
    assert abs(ours - accountant.get_epsilon(delta=delta)) < 1e-6


@pytest.mark.parametrize(("z", "q", "rounds", "delta"), CASES)
def test_epsilon_matches_dp_accounting_pld(z: float, q: float, rounds: int, delta: float) -> None:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)
    assert abs(epsilon(z, q, rounds, delta, "prv") - pld) / pld < 0.05


def test_calibrate_command_meets_the_budget() -> None:
    z = _cli("calibrate", "--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--rounds", "200")[
        "noise_multiplier"
    ]
    assert z == calibrate(3.0, 1e-5, 0.01, 200)
    assert 2.9 <= epsilon(z, 0.01, 200, 1e-5) <= 3.0


def test_commands_refuse_bad_numbers() -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1",
                              "--rounds", "3", "--delta", "1.5"])  # fmt: skip
    assert bad.exit_code == 2
    assert "delta" in bad.output
    bad = runner.invoke(app, ["privacy", "calibrate", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.1",
                              "--rounds", "3", "--accountant", "gdp"])  # fmt: skip
    assert bad.exit_code == 2


GOOD = DpSpec(target_epsilon=5.0, target_delta=1e-5, assumed_population_size=10_000, l2_clip_norm=1.0)


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"target_epsilon": 0.0}, "spec.dp.target_epsilon", "> 0"),
        ({"target_epsilon": -1.0}, "spec.dp.target_epsilon", "> 0"),
        ({"target_delta": 0.0}, "spec.dp.target_delta", "(0, 1)"),
        ({"target_delta": 1.0}, "spec.dp.target_delta", "(0, 1)"),
        ({"l2_clip_norm": 0.0}, "spec.dp.l2_clip_norm", "> 0"),
        ({"assumed_population_size": 50}, "spec.dp.assumed_population_size", "max_cohort"),
        ({"noise_multiplier": 0.3}, "spec.dp.noise_multiplier", "contradicts the budget"),
        ({"target_epsilon": 1e-4}, "spec.dp.target_epsilon", "cannot be met"),
        ({"accountant": "gdp"}, "spec.dp.accountant", "prv"),
    ],
)
def test_budget_validation_names_the_field(change: dict[str, object], field: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        replace(GOOD, **change).resolve(rounds=20, report_goal=80, max_cohort=100)  # type: ignore[arg-type]
    assert info.value.field == field
    assert says in info.value.public_message
    if "contradicts" in says or "cannot be met" in says:
        assert "ε=" in info.value.public_message


def test_resolve_calibrates_and_keeps_a_given_consistent_multiplier() -> None:
    resolved = GOOD.resolve(rounds=20, report_goal=80, max_cohort=100)
    assert resolved.noise_multiplier > 0
    assert resolved.min_clients == 80
    assert epsilon(resolved.noise_multiplier, 0.008, 20, 1e-5) <= 5.0
    given = replace(GOOD, noise_multiplier=5.0).resolve(rounds=20, report_goal=80, max_cohort=100)
    assert given.noise_multiplier == 5.0


def test_epsilon_is_kept_per_process_keyed_on_every_argument() -> None:
    """The memo answers what Opacus answers, and a change in any argument is a different value, not a hit."""
    args = (1.1, 0.01, 3, 1e-5, "prv")
    first = epsilon(*args)
    hits = epsilon.cache_info().hits
    assert epsilon(*args) == first == epsilon.__wrapped__(*args)
    assert epsilon.cache_info().hits == hits + 1
    changed = [(1.2, 0.01, 3, 1e-5, "prv"), (1.1, 0.02, 3, 1e-5, "prv"), (1.1, 0.01, 4, 1e-5, "prv"),
               (1.1, 0.01, 3, 1e-6, "prv"), (1.1, 0.01, 3, 1e-5, "rdp")]  # fmt: skip
    assert all(epsilon(*c) != first for c in changed)


def test_rdp_kept_per_order_changes_no_epsilon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opacus' RDP kept per (q, z, order) (core/privacy.py ``_import_accountants``) gives Opacus' own ε, bit for bit:
    for a new (q, z), for another round count of a known one, for another z of the same q, by both accountants."""
    from opacus.accountants.analysis import rdp

    cases = [(1.3, 0.02, 1, 1e-5, "prv"), (1.3, 0.02, 7, 1e-5, "prv"), (1.1, 0.02, 7, 1e-5, "prv"),
             (0.9, 0.3, 40, 1e-6, "prv"), (1.3, 0.02, 9, 1e-5, "rdp")]  # fmt: skip
    hits = rdp._compute_rdp.cache_info().hits if hasattr(rdp._compute_rdp, "cache_info") else 0
    kept = [epsilon.__wrapped__(*case) for case in cases]
    assert rdp._compute_rdp.cache_info().hits > hits  # the memo served these cases' later evaluations
    assert rdp._compute_rdp.__wrapped__.__module__ == rdp.__name__  # over Opacus' own function
    monkeypatch.setattr(rdp, "_compute_rdp", rdp._compute_rdp.__wrapped__)  # Opacus' function, called afresh
    assert [epsilon.__wrapped__(*case) for case in cases] == kept


def test_rdp_kept_per_order_tells_types_apart_and_passes_unhashable_arguments_through() -> None:
    import numpy as np
    from opacus.accountants.analysis import rdp

    epsilon.__wrapped__(1.2, 0.05, 1, 1e-5)  # the memo is installed
    original = rdp._compute_rdp.__wrapped__
    size = rdp._compute_rdp.cache_info().currsize
    assert rdp._compute_rdp(0.0513, 20, 2.5) == original(0.0513, 20, 2.5)
    assert rdp._compute_rdp(0.0513, 20.0, 2.5) == original(0.0513, 20.0, 2.5)
    assert rdp._compute_rdp.cache_info().currsize == size + 2  # an int z and a float z are kept apart
    assert rdp.compute_rdp(q=np.array(0.05), noise_multiplier=1.2, steps=3, orders=[2.5, 8]).tolist() == [
        original(np.array(0.05), 1.2, 2.5) * 3,
        original(np.array(0.05), 1.2, 8) * 3,
    ]  # an array cannot be a key: computed as Opacus would, not refused
