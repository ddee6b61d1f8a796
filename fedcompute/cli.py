"""The `fedcompute` command: demo, up, serve, task, devices, keys, privacy, audit."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from fedcompute.core.logs import configure_logging
from fedcompute.privacy_cli import privacy_app
from fedcompute.task_cli import ServerOpt, task_app
from fedcompute.task_cli import call as _call
from fedcompute.task_cli import operators as _operators
from fedcompute.task_cli import settings_or_exit as _settings
from fedcompute.token_cli import token_app

app = typer.Typer(help="fedcompute: federated-compute server suite.", no_args_is_help=True)
devices_app = typer.Typer(help="Simulated device fleets.", no_args_is_help=True)
app.add_typer(task_app, name="task")
app.add_typer(devices_app, name="devices")
keys_app = typer.Typer(help="Key provider set-up.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(privacy_app, name="privacy")
app.add_typer(token_app, name="token")


def _stop_on_signal() -> threading.Event:
    """Install SIGINT/SIGTERM handlers first thing, so a signal during start-up still stops cleanly."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


@app.command()
def demo(
    devices: Annotated[int, typer.Option(min=1, max=500, help="Simulated devices.")] = 20,
    rounds: Annotated[int, typer.Option(min=1, max=100, help="Training rounds.")] = 5,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: SQLite in workdir).")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Where data goes (default: a fresh temp directory).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG plot path (default: WORKDIR/accuracy.png).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data split, shards and initial model.")] = 0,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900.0,
    key_services: Annotated[int, typer.Option(min=1, max=16, help="Independent key services (n).")] = 3,
    threshold: Annotated[int, typer.Option(min=1, max=16, help="Shares needed to rebuild a key (t).")] = 2,
    dp: Annotated[bool, typer.Option("--dp", help="Train with user-level differential privacy.")] = False,
    epsilon: Annotated[float, typer.Option(min=0.0, help="DP: privacy budget ε.")] = 10.0,
    delta: Annotated[
        float | None, typer.Option(help="DP: δ (default 1e-3, or 1/devices^1.1 from 100 devices).")
    ] = None,
    clip: Annotated[float, typer.Option(min=0.0, help="DP: L2 clip norm (initial, if adaptive).")] = 2.0,
    adaptive_clip: Annotated[bool, typer.Option("--adaptive-clip", help="DP: adapt the clip norm.")] = False,
    noise_metrics: Annotated[
        bool, typer.Option("--noise-metrics", help="DP: release devices' metrics noised.")
    ] = False,
    model: Annotated[
        str | None, typer.Option(help="Your model: PATH.py:FUNCTION (64 inputs, 10 classes) instead of the built-in.")
    ] = None,
) -> None:
    """Run a whole federated training job on this machine and report accuracy per round."""
    import tempfile

    from fedcompute.clients.builder import BuildError
    from fedcompute.clients.demo import (
        DEMO_SETTINGS,
        DemoPrivacy,
        default_delta,
        format_table,
        run_demo,
        write_json,
        write_plot,
    )

    configure_logging(json_lines=False, level=logging.WARNING)
    work = workdir or Path(tempfile.mkdtemp(prefix="fedcompute-demo-"))
    settings = _settings(
        **DEMO_SETTINGS, workdir=work, database_url=database_url, key_services=key_services, threshold=threshold
    )
    privacy = DemoPrivacy(epsilon, delta or default_delta(devices), clip, adaptive_clip, noise_metrics) if dp else None
    try:
        result = run_demo(settings, devices, rounds, seed, timeout, privacy, model)
    except BuildError as exc:
        typer.echo(f"the model cannot be a plan: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_table(result))
    plot_path = plot or work / "accuracy.png"
    write_plot(result, plot_path)
    typer.echo(f"plot: {plot_path}")
    if json_path:
        write_json(result, json_path)
        typer.echo(f"json: {json_path}")


@app.command()
def up(
    workdir: Annotated[Path | None, typer.Option(help="Data directory.")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: SQLite in workdir).")] = None,
    port: Annotated[int | None, typer.Option(help="Server port.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Server processes sharing the port (SO_REUSEPORT).")] = None,
    workers: Annotated[int | None, typer.Option(help="Attested aggregator workers.")] = None,
) -> None:
    """Run the whole suite (key service, server, aggregator, model updater) until interrupted."""
    from fedcompute.suite import DEMO_DISK_WARNING, StartupFailed, start_suite

    stop = _stop_on_signal()
    settings = _settings(
        workdir=workdir, database_url=database_url, server_port=port, server_replicas=replicas,
        aggregator_workers=workers,
    )  # fmt: skip
    configure_logging(settings.log_json, settings.log_level)
    try:
        suite = start_suite(settings)
    except (StartupFailed, OSError, RuntimeError) as exc:  # one line, no traceback; children die with us
        typer.echo(f"fedcompute up: not started: {exc}", err=True)
        raise typer.Exit(1) from None
    keys = ", ".join(suite.key_addresses)
    typer.echo(f"fedcompute up: server {suite.server_address}, key services {keys}", err=True)
    typer.echo(f"fedcompute up: {DEMO_DISK_WARNING}", err=True)
    stop.wait()
    suite.stop()


@app.command()
def serve(
    component: Annotated[str, typer.Argument(help="server | keys | verifier | dealer | aggregator | modelupdater")],
) -> None:
    """Run one component (settings from FEDCOMPUTE_* environment variables)."""
    stop = _stop_on_signal()
    from fedcompute.core.clock import RandomIds, SystemClock
    from fedcompute.core.loops import PollingLoop
    from fedcompute.suite import key_admin_token, token_secret, worker_token

    settings = _settings()
    configure_logging(settings.log_json, settings.log_level)
    clock, ids = SystemClock(), RandomIds()
    stoppers: list[Any] = []
    if component == "server":
        from fedcompute.server.app import build_server

        stoppers.append(build_server(settings, clock, ids, worker_token(settings), token_secret(settings)))
    elif component == "keys":
        from fedcompute.keys.app import build_key_server
        from fedcompute.keys.kek import KekUnavailable

        try:
            stoppers.append(build_key_server(settings, clock, key_admin_token(settings)))
        except KekUnavailable as exc:
            typer.echo(f"key service not started: {exc}", err=True)
            raise typer.Exit(2) from None
    elif component == "verifier":
        from fedcompute.attestation.app import build_verifier, build_verifier_server
        from fedcompute.keys.trust import load_trusted

        audience = sorted(load_trusted(settings.trusted_providers_path()))
        stoppers.append(build_verifier_server(settings, build_verifier(settings, clock, ids, audience)))
    elif component == "dealer":
        from fedcompute.suite import build_dealer

        dealer = build_dealer(settings, clock, key_admin_token(settings))
        stoppers.append(PollingLoop("dealer", dealer.run_once, settings.poll_interval_s).start())
    elif component == "aggregator":
        from fedcompute.attestation.app import platform_ca
        from fedcompute.suite import start_launcher

        platform_ca(settings)
        stoppers.append(start_launcher(settings, clock, worker_token(settings)))
    elif component == "modelupdater":
        from fedcompute.modelupdater.updater import ModelUpdater
        from fedcompute.server.app import open_storage

        db, blobs = open_storage(settings)
        updater = ModelUpdater(db, blobs, clock, ids, settings.max_round_attempts, settings.upload_retention_s)
        stoppers.append(PollingLoop("modelupdater", updater.run_once, settings.poll_interval_s).start())
    else:
        typer.echo(f"unknown component {component!r}: see `fedcompute serve --help`", err=True)
        raise typer.Exit(2)
    stop.wait()
    for item in stoppers:
        item.stop()


@keys_app.command("trust")
def keys_trust(
    key_service: Annotated[list[str], typer.Option(help="A key service address (repeat for each provider).")],
    out: Annotated[Path, typer.Option(help="Where to write the trusted-providers file.")],
) -> None:
    """Pin the key providers' signing keys (trust on first use; check them out of band in production)."""
    from fedcompute.suite import pin_providers

    settings = _settings(trusted_providers_file=out)
    _call(lambda: pin_providers(settings, key_service))
    typer.echo(f"trusted providers written to {out}")


@app.command("audit")
def audit_cmd(
    task: Annotated[str, typer.Option(help="The task whose published versions to check.")],
    key_service: Annotated[list[str], typer.Option(help="A key service address (repeat for each provider).")],
    server: ServerOpt = "127.0.0.1:8700",
    trusted_providers: Annotated[
        Path | None, typer.Option(help="Pinned key providers (default: workdir/public/trusted-providers.json).")
    ] = None,
    threshold: Annotated[int | None, typer.Option(min=1, help="Providers a release needs (default: settings).")] = None,
) -> None:
    """Check every published version of a task against the key services' signed release logs; exit 1 on findings."""
    from fedcompute.clients.audit import fetch_and_audit, render
    from fedcompute.clients.typed import KeyClient
    from fedcompute.keys.trust import load_trusted
    from fedcompute.rpc.channels import open_channel

    settings = _settings()
    trusted = load_trusted(trusted_providers or settings.trusted_providers_path())

    def run() -> None:
        clients = [KeyClient(open_channel(a), 30.0) for a in key_service]
        report = fetch_and_audit(_operators(server), clients, task, trusted, threshold or settings.threshold)
        typer.echo(render(report))
        if not report.ok:
            raise typer.Exit(1)

    _call(run)


@devices_app.command("simulate")
def devices_simulate(
    population: Annotated[str, typer.Option(help="Population to join.")],
    server: ServerOpt = "127.0.0.1:8700",
    count: Annotated[int, typer.Option(min=1, max=1000, help="Number of devices.")] = 20,
    seed: Annotated[int, typer.Option()] = 0,
    client_version: Annotated[str, typer.Option()] = "1.0.0",
    max_sleep: Annotated[float, typer.Option(help="Cap on retry-window sleeps (s).")] = 5.0,
    trusted_providers: Annotated[
        Path, typer.Option(help="Pinned key providers (from `fedcompute keys trust`).")
    ] = Path("fedcompute-data/trusted-providers.json"),
    threshold: Annotated[int, typer.Option(min=1, help="Valid provider signatures a key needs.")] = 2,
    require_dp: Annotated[bool, typer.Option(help="Floor: refuse tasks whose access policy has no DP.")] = False,
    min_clients: Annotated[int, typer.Option(min=1, help="Floor: refuse policies releasing fewer updates.")] = 1,
    collection: Annotated[
        str, typer.Option(help="The devices' example collection: digits or breast_cancer.")
    ] = "digits",
) -> None:
    """Run a simulated fleet against a running suite until the population has no open task."""
    import torch

    from fedcompute.clients.dataset import COLLECTIONS, non_iid_shards, train_test_split
    from fedcompute.clients.fleet import Fleet

    configure_logging(json_lines=False, level=logging.WARNING)
    torch.set_num_threads(1)
    if collection not in COLLECTIONS:
        raise typer.BadParameter(f"known: {', '.join(COLLECTIONS)}", param_hint="--collection")
    train, _ = train_test_split(seed, collection=collection)
    from fedcompute.clients.device import Trust
    from fedcompute.core.policy import DeviceFloor
    from fedcompute.keys.trust import load_trusted

    floor = DeviceFloor(require_dp=require_dp, min_clients=min_clients, min_threshold=threshold)
    trust = Trust(load_trusted(trusted_providers), threshold, floor)
    shards = non_iid_shards(train, count, seed)
    fleet = Fleet(
        server, population, shards, seed, trust, max_sleep_s=max_sleep, client_version=client_version,
        collection=collection,
    )  # fmt: skip
    fleet.start(stop_when_no_task=True)
    fleet.wait(lambda: False)
    fleet.stop()
    s = fleet.stats
    typer.echo(
        f"participations {s.participations}, uploads {s.uploads}, rejections {s.rejections}, "
        f"refused keys or policies {s.refused_keys}, errors {s.errors}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
