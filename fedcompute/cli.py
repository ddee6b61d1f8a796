"""The `fedcompute` command: demo, up, serve, task, devices, keys, privacy, audit."""

from __future__ import annotations

import logging
import signal
import threading
from functools import partial
from pathlib import Path
from typing import Annotated

import structlog
import typer

from fedcompute.core.logs import configure_logging
from fedcompute.core.memory import hold_frozen, keep_large_buffers
from fedcompute.ops_cli import certs_app, config_app
from fedcompute.privacy_cli import privacy_app
from fedcompute.rpc.errors import one_line, unreachable
from fedcompute.task_cli import ServerOpt, task_app
from fedcompute.task_cli import call as _call
from fedcompute.task_cli import operators as _operators
from fedcompute.task_cli import setting_or_exit as _call_setting
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
app.add_typer(certs_app, name="certs")
app.add_typer(config_app, name="config")


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
    tls: Annotated[bool, typer.Option("--tls", help="All-TLS with a local dev CA (WORKDIR/tls; mTLS inside).")] = False,
    plaintext: Annotated[bool, typer.Option("--plaintext", help="No TLS (a trusted network only).")] = False,
) -> None:
    """Run the whole suite (key service, server, aggregator, model updater) until interrupted."""
    from fedcompute.components import dev_tls
    from fedcompute.core.settings import SettingError
    from fedcompute.suite import DEMO_DISK_WARNING, StartupFailed, start_suite

    stop = _stop_on_signal()
    settings = _settings(
        workdir=workdir, database_url=database_url, server_port=port, server_replicas=replicas,
        aggregator_workers=workers, plaintext=True if plaintext else None,
    )  # fmt: skip
    if tls:
        settings = dev_tls(settings)
    configure_logging(settings.log_json, settings.log_level, "up")
    try:
        suite = start_suite(settings)
    except SettingError as exc:
        hint = " (or `up --tls` / `up --plaintext`)" if exc.setting.startswith("tls_") else ""
        typer.echo(f"fedcompute up: not started: {exc}{hint}", err=True)
        raise typer.Exit(2) from None
    except (StartupFailed, OSError, RuntimeError) as exc:  # one line, no traceback; children die with us
        typer.echo(f"fedcompute up: not started: {exc}", err=True)
        raise typer.Exit(1) from None
    keys = ", ".join(suite.key_addresses)
    structlog.get_logger("fedcompute.up").info(
        "component_started", address=suite.server_address, key_services=suite.key_addresses,
        config=suite.settings.public(),
    )  # fmt: skip
    typer.echo(f"fedcompute up: server {suite.server_address}, key services {keys}", err=True)
    typer.echo(f"fedcompute up: {DEMO_DISK_WARNING}", err=True)
    hold_frozen(stop)  # until stopped; no full collection walks start-up's objects again (core/memory.py)
    suite.stop(settings.shutdown_grace_s)


@app.command()
def serve(
    component: Annotated[str, typer.Argument(help="server | keys | verifier | dealer | aggregator | modelupdater")],
) -> None:
    """Run one component (settings from FEDCOMPUTE_* environment variables; `fedcompute config list`)."""
    stop = _stop_on_signal()
    from fedcompute.components import COMPONENTS, announce_start, start_component
    from fedcompute.core.settings import SettingError
    from fedcompute.keys.kek import KekUnavailable
    from fedcompute.rpc.metrics import process_registry

    if component not in COMPONENTS:
        typer.echo(f"unknown component {component!r}: one of {', '.join(COMPONENTS)}", err=True)
        raise typer.Exit(2)
    settings = _settings()
    configure_logging(settings.log_json, settings.log_level, component)
    registry = process_registry()
    try:
        running = start_component(component, settings, registry)
        # the aggregator's launcher serves no metrics: its worker, with the same settings, serves them
        announce_start(component, settings, running.address, registry, metrics=component != "aggregator")
    except (SettingError, KekUnavailable) as exc:
        typer.echo(f"{component} not started: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        if not unreachable(exc):
            raise
        typer.echo(f"{component} not started: a dependency is unreachable: {one_line(exc)}", err=True)
        raise typer.Exit(1) from None
    hold_frozen(stop)  # until stopped; no full collection walks start-up's objects again (core/memory.py)
    running.stop(settings.shutdown_grace_s)


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
    from fedcompute.rpc.channels import channel_for

    settings = _settings()
    trusted = load_trusted(trusted_providers or settings.trusted_providers_path())

    def run() -> None:
        clients = [KeyClient(_call_setting(partial(channel_for, settings, a)), 30.0) for a in key_service]
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
    from fedcompute.rpc.tls import client_tls

    tls = _call_setting(lambda: client_tls(_settings()))
    floor = DeviceFloor(require_dp=require_dp, min_clients=min_clients, min_threshold=threshold)
    trust = Trust(load_trusted(trusted_providers), threshold, floor)
    shards = non_iid_shards(train, count, seed)
    fleet = Fleet(
        server, population, shards, seed, trust, max_sleep_s=max_sleep, client_version=client_version,
        collection=collection, tls=tls,
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
    keep_large_buffers()  # every fedcompute process: servers, key services, up, demo (core/memory.py)
    app()


if __name__ == "__main__":
    main()
