"""`fedcompute token`: create, revoke and list the operator tokens TaskManagementService accepts.

Two modes, chosen by ``--server``:

- without it, the command works on the server's database directly (FEDCOMPUTE_DATABASE_URL, or the SQLite file
  under FEDCOMPUTE_WORKDIR): for the first admin token of a deployment, by whoever holds the database credential;
- with ``--server HOST:PORT`` it calls the admin RPCs and presents FEDCOMPUTE_OPERATOR_TOKEN, which must be an
  admin token.

The token itself is printed once, alone on stdout (so ``export FEDCOMPUTE_OPERATOR_TOKEN=$(fedcompute token create
...)`` works); the server keeps only its sha256.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedcompute.core.logs import configure_logging
from fedcompute.task_cli import call, operators, settings_or_exit

if TYPE_CHECKING:
    from fedcompute.server.operator_auth import OperatorAuthService
    from fedcompute.store.operator_tokens import OperatorTokenRecord

token_app = typer.Typer(
    help="Operator tokens for TaskManagementService (roles: viewer < operator < admin).", no_args_is_help=True
)
ViaServer = Annotated[
    str,
    typer.Option(
        "--server",
        help="Use the admin RPCs of this server (host:port) with FEDCOMPUTE_OPERATOR_TOKEN (an admin token); "
        "without it: the server's database directly (FEDCOMPUTE_DATABASE_URL or the workdir's SQLite file).",
    ),
]


class RoleName(StrEnum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"


@contextmanager
def _database() -> Iterator[OperatorAuthService]:
    """The auth service on the server's own database (migrated to the current schema first)."""
    from sqlalchemy.exc import OperationalError

    from fedcompute.core.clock import RandomIds, SystemClock
    from fedcompute.server.operator_auth import OperatorAuthService
    from fedcompute.store.database import Database

    settings = settings_or_exit()
    default = settings.server_dir() / "fedcompute.sqlite"
    if not settings.database_url and not default.exists():  # never a fresh database no server reads
        typer.echo(
            f"no server database at {default}: set FEDCOMPUTE_WORKDIR or FEDCOMPUTE_DATABASE_URL to the server's "
            "(or start the server once first), or use --server",
            err=True,
        )
        raise typer.Exit(2)
    db = Database(settings.resolved_database_url())
    try:
        db.migrate()
        yield OperatorAuthService(db, SystemClock(), RandomIds())
    except OperationalError as exc:
        typer.echo(f"cannot use the server's database: {exc.orig or exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()


def _quiet() -> None:
    """Warnings and errors only, to stderr: stdout is the command's own output (a token, JSON)."""
    configure_logging(json_lines=False, level=logging.WARNING)


def _record(record: OperatorTokenRecord) -> dict[str, Any]:
    return {
        "token_id": record.token_id,
        "name": record.name,
        "role": record.role,
        "created_at": record.created_at.isoformat(),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
    }


def _message(message: Any) -> dict[str, Any]:
    from fedcompute.v1 import task_management_pb2 as tm

    return {
        "token_id": message.token_id,
        "name": message.name,
        "role": tm.OperatorRole.Name(message.role).removeprefix("OPERATOR_ROLE_").lower(),
        "created_at": message.created_time.ToDatetime(tzinfo=UTC).isoformat(),
        "revoked_at": message.revoked_time.ToDatetime(tzinfo=UTC).isoformat()
        if message.HasField("revoked_time")
        else None,
    }


def _print(rows: list[dict[str, Any]]) -> None:
    typer.echo(json.dumps({"operator_tokens": rows}, indent=2))


def _refused(action: str, exc: Any) -> typer.Exit:
    typer.echo(f"token not {action}: {exc.public_message}", err=True)
    return typer.Exit(1)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what the token is for (e.g. alice, ci-deploy).")],
    role: Annotated[RoleName, typer.Option(help="What it may do: viewer, operator or admin.")],
    server: ViaServer = "",
) -> None:
    """Make a token and print it, once, alone on stdout; the server keeps only its sha256."""
    _quiet()
    from fedcompute.core.errors import FedcomputeError
    from fedcompute.server.operator_auth import Role

    if server:
        from fedcompute.v1 import task_management_pb2 as tm

        def remote() -> None:
            wanted = tm.OperatorRole.Value(f"OPERATOR_ROLE_{role.value.upper()}")
            made = operators(server).create_operator_token(tm.CreateOperatorTokenRequest(name=name, role=wanted))
            typer.echo(
                f"{role.value} token {name!r} created ({made.operator_token.token_id}); shown only now", err=True
            )
            typer.echo(made.token)

        call(remote)
        return
    try:
        with _database() as auth:
            record, token = auth.create(name, Role.parse(role.value), by="`fedcompute token create` (database)")
    except FedcomputeError as exc:
        raise _refused("created", exc) from None
    typer.echo(f"{record.role} token {name!r} created ({record.token_id}); shown only now", err=True)
    typer.echo(token)


@token_app.command("revoke")
def token_revoke(
    name_or_id: Annotated[str, typer.Argument(help="A token id, or a name (every token with it is revoked).")],
    server: ViaServer = "",
) -> None:
    """Revoke tokens: refused at once by the server that revoked them, within a second or two by the others."""
    _quiet()
    from fedcompute.core.errors import FedcomputeError

    if server:
        from fedcompute.v1 import task_management_pb2 as tm

        def remote() -> None:
            request = tm.RevokeOperatorTokenRequest(name_or_id=name_or_id)
            _print([_message(t) for t in operators(server).revoke_operator_token(request).operator_tokens])

        call(remote)
        return
    try:
        with _database() as auth:
            revoked = auth.revoke(name_or_id, by="`fedcompute token revoke` (database)")
    except FedcomputeError as exc:
        raise _refused("revoked", exc) from None
    _print([_record(r) for r in revoked])


@token_app.command("list")
def token_list(server: ViaServer = "") -> None:
    """Every token, active and revoked (never the tokens themselves)."""
    _quiet()
    if server:
        from fedcompute.v1 import task_management_pb2 as tm

        def remote() -> None:
            listed = operators(server).list_operator_tokens(tm.ListOperatorTokensRequest())
            _print([_message(t) for t in listed.operator_tokens])

        call(remote)
        return
    with _database() as auth:
        _print([_record(r) for r in auth.tokens()])
