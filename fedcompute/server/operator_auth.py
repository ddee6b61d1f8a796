"""Operator auth: bearer tokens with ordered roles (viewer < operator < admin) for TaskManagementService.

A token is ``fct_`` followed by 32 random bytes (url-safe base64) from the OS CSPRNG, shown once when created;
the store keeps only its sha256, and a presented token is checked by looking up its hash. Verified tokens are
remembered for ``cache_s`` (1 s by default) per process, so a revocation takes effect at once in the process that
revoked it and within ``cache_s`` everywhere else (other replicas, or the `fedcompute token` CLI's database mode).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from datetime import datetime, timedelta
from enum import IntEnum

import structlog

from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from fedcompute.store.database import Database
from fedcompute.store.operator_tokens import OperatorTokenRecord, OperatorTokenRepository

log = structlog.get_logger("fedcompute.operator_auth")
TOKEN_PREFIX = "fct_"
MIN_TOKEN_CHARS = 32  # ensure(): a token chosen elsewhere must carry at least ~190 bits
CACHE_S = 1.0
MAX_CACHED = 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
MISSING = (
    "this RPC needs an operator token: send 'authorization: Bearer <token>' "
    "(the CLI reads FEDCOMPUTE_OPERATOR_TOKEN; an admin makes one with `fedcompute token create`)"
)
INVALID = "the operator token is unknown or revoked: ask an admin for a new one (`fedcompute token create`)"


class Role(IntEnum):
    """Ordered: each role may do everything the roles below it may."""

    VIEWER = 1  # GetTask, ListTasks, ListIterations, ListModelVersions
    OPERATOR = 2  # + CreateTask, CancelTask
    ADMIN = 3  # + CreateOperatorToken, RevokeOperatorToken, ListOperatorTokens

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str, field: str = "role") -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise InvalidArgument(field, f"{text!r} is not a role: viewer, operator or admin") from None


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(
            "name", "must be 1-128 characters: letters, digits and . _ @ : - (starting with a letter or digit)"
        )
    return name


class OperatorAuthService:
    def __init__(self, db: Database, clock: Clock, ids: IdGenerator, cache_s: float = CACHE_S) -> None:
        self._db = db
        self._clock = clock
        self._ids = ids
        self._ttl = timedelta(seconds=cache_s)
        self._cache: dict[str, tuple[OperatorTokenRecord, datetime]] = {}
        self._lock = threading.Lock()

    def authorize(self, presented: str | None, needed: Role) -> OperatorTokenRecord:
        """The caller's token record if it may act as ``needed``; else ``Unauthenticated`` (no, unknown or revoked
        token) or ``PermissionDenied`` (a valid token of a lower role)."""
        if not presented:
            raise Unauthenticated(MISSING)
        digest = token_sha256(presented)
        record = self._cached(digest)
        if record is None:
            with self._db.transaction() as s:
                record = OperatorTokenRepository(s).by_hash(digest)
            if record is None or not record.active:
                log.info("operator_token_refused", token_id=record.token_id if record else None)
                raise Unauthenticated(INVALID)
            self._remember(digest, record)
        if Role.parse(record.role) < needed:
            raise PermissionDenied(
                f"this RPC needs the {needed.label} role; the token {record.name!r} has the {record.role} role"
            )
        return record

    def create(self, name: str, role: Role, by: str) -> tuple[OperatorTokenRecord, str]:
        """A new token for ``name``: its record, and the token itself, which is shown this once and never stored."""
        _check_name(name)
        token = new_token()
        now = self._clock.now()
        with self._db.transaction() as s:
            tokens = OperatorTokenRepository(s)
            if any(t.active for t in tokens.named(name)):
                raise FailedPrecondition(f"a token named {name!r} is active: revoke it first, or choose another name")
            record = tokens.add(self._ids.new_id("optok"), name, role.label, token_sha256(token), now, by)
        log.info("operator_token_created", token_id=record.token_id, name=name, role=role.label, by=by)
        return record, token

    def ensure(self, token: str, name: str, role: Role) -> OperatorTokenRecord:
        """Register a token made elsewhere (`fedcompute up`'s own) unless it is registered already; idempotent.
        A registered token keeps its name and role; a revoked one stays revoked (``FailedPrecondition``)."""
        _check_name(name)
        if len(token) < MIN_TOKEN_CHARS:
            raise InvalidArgument("operator_token", f"is too short: use at least {MIN_TOKEN_CHARS} random characters")
        digest = token_sha256(token)
        with self._db.transaction() as s:
            tokens = OperatorTokenRepository(s)
            existing = tokens.by_hash(digest)
            if existing is None:
                record = tokens.add(self._ids.new_id("optok"), name, role.label, digest, self._clock.now(), "ensure")
                log.info("operator_token_created", token_id=record.token_id, name=name, role=role.label, by="ensure")
                return record
        if not existing.active:
            raise FailedPrecondition(
                f"the operator token {existing.name!r} ({existing.token_id}) was revoked: set "
                "FEDCOMPUTE_OPERATOR_TOKEN to a valid token, or delete WORKDIR/operator/operator-token for a new one"
            )
        return existing

    def revoke(self, name_or_id: str, by: str) -> list[OperatorTokenRecord]:
        """Revoke the token with this id, or every token with this name; revoking again changes nothing."""
        now = self._clock.now()
        with self._db.transaction() as s:
            tokens = OperatorTokenRepository(s)
            by_id = tokens.get(name_or_id)
            targets = [by_id] if by_id else tokens.named(name_or_id)
            if not targets:
                raise NotFound(f"no operator token has the name or id {name_or_id!r} (`fedcompute token list`)")
            revoked = [t.token_id for t in targets if tokens.revoke(t.token_id, now, by)]
            records = [tokens.get(t.token_id) or t for t in targets]
        with self._lock:
            for digest in [d for d, (r, _) in self._cache.items() if r.token_id in revoked]:
                del self._cache[digest]
        for token_id in revoked:
            log.info("operator_token_revoked", token_id=token_id, by=by)
        return records

    def tokens(self) -> list[OperatorTokenRecord]:
        """Every token, active and revoked, oldest first (never the tokens themselves)."""
        with self._db.transaction() as s:
            return OperatorTokenRepository(s).all()

    def _cached(self, digest: str) -> OperatorTokenRecord | None:
        with self._lock:
            hit = self._cache.get(digest)
            if hit is None:
                return None
            record, until = hit
            if self._clock.now() >= until:
                del self._cache[digest]
                return None
            return record

    def _remember(self, digest: str, record: OperatorTokenRecord) -> None:
        with self._lock:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (record, self._clock.now() + self._ttl)
