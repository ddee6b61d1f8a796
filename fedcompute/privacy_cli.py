"""`fedcompute privacy`: differential-privacy accounting from the command line (Opacus accountants)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

privacy_app = typer.Typer(help="Differential-privacy accounting (Opacus accountants).", no_args_is_help=True)

Accountant = Annotated[str, typer.Option(help="prv (reported) or rdp (cross-check).")]
SampleRate = Annotated[float, typer.Option(min=0.0, max=1.0, help="q = clients per round / population.")]
Rounds = Annotated[int, typer.Option(min=1, help="Rounds (one Gaussian step each).")]
Delta = Annotated[float, typer.Option(min=0.0, max=1.0, help="Target delta.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise typer.BadParameter(f"must be > 0, got {value}", param_hint=f"--{name.replace('_', '-')}")


def _open_unit(**values: float) -> None:
    for name, value in values.items():
        if not 0 < value < 1:
            raise typer.BadParameter(f"must be in (0, 1), got {value}", param_hint=f"--{name.replace('_', '-')}")


def _accountant(name: str) -> str:
    if name not in ("prv", "rdp"):
        typer.echo(f"--accountant must be prv or rdp, not {name!r}", err=True)
        raise typer.Exit(2)
    return name


@privacy_app.command("epsilon")
def privacy_epsilon(
    noise_multiplier: Annotated[float, typer.Option(min=0.0, help="Noise multiplier z.")],
    sample_rate: SampleRate,
    rounds: Rounds,
    delta: Delta,
    accountant: Accountant = "prv",
    as_json: JsonFlag = False,
) -> None:
    """The ε that T rounds of the Gaussian mechanism with multiplier z and sampling rate q spend at δ."""
    from fedcompute.core.privacy import epsilon

    _positive(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    _open_unit(delta=delta)
    value = epsilon(noise_multiplier, sample_rate, rounds, delta, _accountant(accountant))
    if as_json:
        typer.echo(json.dumps({"epsilon": value, "noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
                               "rounds": rounds, "delta": delta, "accountant": accountant}))  # fmt: skip
    else:
        typer.echo(f"{value:.6g}")


@privacy_app.command("calibrate")
def privacy_calibrate(
    epsilon: Annotated[float, typer.Option("--epsilon", min=0.0, help="Target epsilon.")],
    delta: Delta,
    sample_rate: SampleRate,
    rounds: Rounds,
    accountant: Accountant = "prv",
    as_json: JsonFlag = False,
) -> None:
    """The noise multiplier z that keeps T rounds within (ε, δ)."""
    from fedcompute.core.privacy import calibrate

    _positive(epsilon=epsilon, sample_rate=sample_rate)
    _open_unit(delta=delta)
    value = calibrate(epsilon, delta, sample_rate, rounds, _accountant(accountant))
    if as_json:
        typer.echo(json.dumps({"noise_multiplier": value, "epsilon": epsilon, "sample_rate": sample_rate,
                               "rounds": rounds, "delta": delta, "accountant": accountant}))  # fmt: skip
    else:
        typer.echo(f"{value:.6g}")
