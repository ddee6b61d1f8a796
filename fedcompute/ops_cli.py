"""`fedcompute certs dev` and `fedcompute config list|check`: set-up and validation of a deployment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fedcompute.core.settings import SECRET_SETTINGS, SettingError, Settings, variable
from fedcompute.task_cli import settings_or_exit

certs_app = typer.Typer(help="TLS certificates.", no_args_is_help=True)
config_app = typer.Typer(help="Settings: list them, check a deployment's.", no_args_is_help=True)

# What each component reads beyond the common settings (workdir, host, logs, metrics, TLS, timeouts), and the
# shared files it needs; docs/operations.md has the same table.
NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "server": (
        ("database_url", "server_port", "key_service_addresses", "internal_token", "token_secret",
         "blob_store_url", "device_rate_per_s", "device_attestation", "max_upload_bytes", "lease_s"),
        (),
    ),
    "keys": (
        ("provider_id", "key_service_port", "key_admin_token", "key_encryption_key", "key_encryption_key_file",
         "allowed_measurements", "attestation_policy"),
        ("public/verifier-public.pem (the verifier's result-signing key)",),
    ),
    "verifier": (
        ("verifier_port", "attestation_policy", "allowed_measurements", "confidential_space_jwks_file"),
        ("trusted-providers file (audience)", "public/platform-ca-public.pem (local launcher evidence)"),
    ),
    "dealer": (
        ("server_address", "key_service_addresses", "key_admin_token", "operator_token", "threshold",
         "key_lifetime_s", "health_port"),
        ("trusted-providers file",),
    ),
    "aggregator": (
        ("server_address", "key_service_addresses", "verifier_address", "internal_token", "threshold",
         "health_port"),
        ("trusted-providers file",),
    ),
    "modelupdater": (("database_url", "blob_store_url", "max_round_attempts", "health_port"), ()),
}  # fmt: skip


@certs_app.command("dev")
def certs_dev(
    out: Annotated[Path, typer.Option(help="Directory for ca.pem and NAME.pem / NAME-key.pem.")] = Path("tls"),
    host: Annotated[list[str] | None, typer.Option(help="A host name or IP the certificates name (repeat).")] = None,
) -> None:
    """Make a local CA and a certificate per component (development and tests; never production)."""
    from fedcompute.rpc.certs import COMPONENT_NAMES, make_dev_certs

    certs = make_dev_certs(out, host)
    typer.echo(f"CA: {certs.ca}; certificates for {', '.join(COMPONENT_NAMES)} in {out}")
    typer.echo(
        f"e.g. FEDCOMPUTE_TLS_CA_FILE={certs.ca} FEDCOMPUTE_TLS_CERT_FILE={certs.cert('server')} "
        f"FEDCOMPUTE_TLS_KEY_FILE={certs.key('server')}"
    )


@config_app.command("list")
def config_list() -> None:
    """Every setting: its variable, default and meaning (secrets marked)."""
    for name, spec in Settings.model_fields.items():
        secret = " [secret]" if name in SECRET_SETTINGS else ""
        default = spec.get_default(call_default_factory=True)
        typer.echo(f"{variable(name)}={'' if default is None else default}{secret}\n    {spec.description}")


@config_app.command("check")
def config_check(
    component: Annotated[str, typer.Argument(help="server | keys | verifier | dealer | aggregator | modelupdater")],
) -> None:
    """Check this environment's settings and files for COMPONENT without starting it; exit 2 on a problem."""
    if component not in NEEDS:
        typer.echo(f"unknown component {component!r}: one of {', '.join(NEEDS)}", err=True)
        raise typer.Exit(2)
    settings = settings_or_exit()
    problems = _problems(component, settings)
    for problem in problems:
        typer.echo(f"{component}: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    names, files = NEEDS[component]
    typer.echo(f"{component}: ok ({', '.join(variable(n) for n in names)}; files: {', '.join(files) or 'none'})")


def _problems(component: str, settings: Settings) -> list[str]:
    from fedcompute.rpc.tls import client_tls, server_tls

    problems: list[str] = []
    checks: list[Callable[[], object]] = [lambda: client_tls(settings)]
    if component in ("server", "keys", "verifier"):
        checks.append(lambda: server_tls(settings))
    for check in checks:
        try:
            check()
        except SettingError as exc:
            problems.append(str(exc))
    if component in ("verifier", "dealer", "aggregator") and not settings.trusted_providers_path().is_file():
        problems.append(
            f"{variable('trusted_providers_file')}: no trusted-providers file at {settings.trusted_providers_path()} "
            "(`fedcompute keys trust`)"
        )
    if component == "keys":
        from fedcompute.keys.kek import KekUnavailable, load_kek

        try:
            load_kek(settings)
        except KekUnavailable as exc:
            problems.append(str(exc))
    if component in ("server", "modelupdater"):
        problems += _database_problems(settings)
    return problems


def _creatable(path: Path) -> list[str]:
    import os

    existing = next(p for p in path.parents if p.exists())
    if os.access(existing, os.W_OK):
        return []
    return [f"{variable('database_url')}: cannot create {path}: {existing} is not writable"]


def _database_problems(settings: Settings) -> list[str]:
    from fedcompute.rpc.errors import one_line
    from fedcompute.store.database import Database

    url = settings.resolved_database_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return _creatable(Path(url.removeprefix("sqlite:///")))  # made at first start
    db = Database(url)
    try:
        db.ping()
    except Exception as exc:  # whatever the driver raises, the operator gets one line
        return [f"{variable('database_url')}: cannot reach the database: {one_line(exc)}"]
    finally:
        db.dispose()
    return []
