"""Operator tokens on SQLite and Postgres: hashes only, compare-and-set revocation, the verification cache's window
(with a fake clock), and `ensure` for the token `fedcompute up` generates."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from fedcompute.core.clock import FakeClock, RandomIds
from fedcompute.core.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from fedcompute.server.operator_auth import CACHE_S, OperatorAuthService, Role
from fedcompute.store.database import Database
from fedcompute.store.operator_tokens import OperatorTokenRepository


def test_roles_are_ordered_and_checked(db: Database) -> None:
    auth = OperatorAuthService(db, FakeClock(), RandomIds())
    tokens = {role: auth.create(role.label, role, by="test")[1] for role in Role}
    for held in Role:
        for needed in Role:
            if held >= needed:
                assert auth.authorize(tokens[held], needed).role == held.label
            else:
                with pytest.raises(PermissionDenied, match=f"needs the {needed.label} role"):
                    auth.authorize(tokens[held], needed)
    for presented in (None, "", "fct_unknown"):
        with pytest.raises(Unauthenticated):
            auth.authorize(presented, Role.VIEWER)
    with pytest.raises(InvalidArgument, match="role"):
        Role.parse("root")


def test_revocation_is_compare_and_set_and_reaches_other_processes_within_the_cache_window(db: Database) -> None:
    clock = FakeClock()
    server = OperatorAuthService(db, clock, RandomIds())
    cli = OperatorAuthService(db, clock, RandomIds())  # another process on the same database
    record, token = cli.create("ci", Role.OPERATOR, by="test")
    assert server.authorize(token, Role.OPERATOR).token_id == record.token_id  # now cached by the server
    [revoked] = cli.revoke("ci", by="test")
    assert revoked.revoked_at == clock.now()
    assert server.authorize(token, Role.OPERATOR).name == "ci"  # still inside the cache window
    clock.advance(timedelta(seconds=CACHE_S))
    with pytest.raises(Unauthenticated):
        server.authorize(token, Role.OPERATOR)
    clock.advance(timedelta(seconds=5))
    assert cli.revoke(record.token_id, by="test") == [revoked]  # again: nothing changes, the first time stays
    with db.transaction() as s:
        assert not OperatorTokenRepository(s).revoke(record.token_id, clock.now(), "test")


def test_only_the_sha256_is_stored(db: Database) -> None:
    auth = OperatorAuthService(db, FakeClock(), RandomIds())
    record, token = auth.create("alice", Role.VIEWER, by="test")
    assert token.startswith("fct_")
    assert len(token) == 4 + 43
    with db.transaction() as s:
        found = OperatorTokenRepository(s).by_hash(hashlib.sha256(token.encode()).hexdigest())
    assert found == record
    assert token not in repr(record)


def test_ensure_registers_once_and_never_revives_a_revoked_token(db: Database) -> None:
    auth = OperatorAuthService(db, FakeClock(), RandomIds())
    token = "u" * 43
    first = auth.ensure(token, "up", Role.ADMIN)
    assert auth.ensure(token, "other-name", Role.VIEWER) == first  # idempotent: name and role stay
    assert [t.token_id for t in auth.tokens()] == [first.token_id]
    assert auth.authorize(token, Role.ADMIN).name == "up"
    auth.revoke("up", by="test")
    with pytest.raises(FailedPrecondition, match="was revoked"):
        auth.ensure(token, "up", Role.ADMIN)
    with pytest.raises(InvalidArgument, match="too short"):
        auth.ensure("short", "up", Role.ADMIN)
    assert len(auth.tokens()) == 1
