"""The one place domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from fedcompute.core import errors

STATUS_BY_ERROR: tuple[tuple[type[errors.FedcomputeError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)

COMMITTED_SIZE_KEY = "fedcompute-committed-size"
REFUSAL_KEY, BUDGET_REFUSAL = "fedcompute-refusal", "privacy-budget"  # a trailer: a budget refusal, said so
STALE_REFUSAL = "stale-release-number"  # the same trailer: a DP release numbered at or below a key service's count
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRPC's own retry pushback: clients with a retry policy obey it


def status_for(error: errors.FedcomputeError) -> grpc.StatusCode:
    for cls, code in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def trailing_metadata_for(error: errors.FedcomputeError) -> tuple[tuple[str, str], ...]:
    """Machine-readable detail some errors carry beside their message (e.g. an upload's committed size)."""
    if isinstance(error, errors.OffsetMismatch):
        return ((COMMITTED_SIZE_KEY, str(error.committed_size)),)
    if isinstance(error, errors.BudgetSpent):
        return ((REFUSAL_KEY, BUDGET_REFUSAL),)
    if isinstance(error, errors.StaleReleaseNumber):
        return ((REFUSAL_KEY, STALE_REFUSAL),)
    if isinstance(error, errors.RateLimited):
        return ((RETRY_PUSHBACK_KEY, str(max(1, round(error.retry_after_s * 1000)))),)
    return ()


def unreachable(exc: BaseException) -> bool:
    """A database or network dependency that cannot be reached (duck-typed: rpc does not import sqlalchemy)."""
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    return bool(names & UNREACHABLE)


MAX_MESSAGE_BYTES = 1024  # a refusal's message in UTF-8 (grpc-message, percent-encoded in the trailers: clients
# take 8-16 KiB of them)


def refused_data(exc: BaseException) -> bool:
    """The database refused a value as data (SQLSTATE class 22: a NUL character in text, which Postgres cannot
    store, a number past its column's range, text past its length): a request's field no check caught before it
    reached the database. Duck-typed like ``unreachable``."""
    for e in (exc, getattr(exc, "orig", None), exc.__cause__):
        if e is not None and any(c.__name__ == "DataError" for c in type(e).__mro__):
            return True
    return False


UNREACHABLE = frozenset(
    {
        "OperationalError",
        "InterfaceError",
        "ConnectionError",
        "ConnectionRefusedError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
    }
)


def one_line(exc: BaseException) -> str:
    """The first line of an exception's text (a driver's message without its SQL or traceback)."""
    root = exc.__cause__ or exc
    text = str(getattr(root, "orig", None) or root).strip().splitlines()
    return f"{type(root).__name__}: {text[0] if text else ''}"
