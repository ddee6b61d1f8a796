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
    if isinstance(error, errors.RateLimited):
        return ((RETRY_PUSHBACK_KEY, str(max(1, round(error.retry_after_s * 1000)))),)
    return ()
