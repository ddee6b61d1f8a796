"""The domain's error hierarchy.

Services raise these; the gRPC layer maps each class to one status code in one place
(``fedcompute.server.runtime.errors``). ``public_message`` is shown to the caller and must tell a person what to
do; internal detail goes to the log only.
"""

from __future__ import annotations


class FedcomputeError(Exception):
    """Base class: a failure with a message safe to show to the caller."""

    def __init__(self, public_message: str) -> None:
        super().__init__(public_message)
        self.public_message = public_message


class InvalidArgument(FedcomputeError):
    """The request is malformed; ``field`` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(FedcomputeError):
    """The named entity does not exist."""


class FailedPrecondition(FedcomputeError):
    """The request is valid but the system is not in a state to accept it."""


class OffsetMismatch(FailedPrecondition):
    """An upload write did not start at the committed size; the device should resume from there."""

    def __init__(self, committed_size: int, write_offset: int) -> None:
        super().__init__(
            f"write_offset {write_offset} does not match the committed size {committed_size}; "
            f"resume the upload from offset {committed_size}"
        )
        self.committed_size = committed_size


class PermissionDenied(FedcomputeError):
    """The caller is identified but not allowed to do this."""


class Unauthenticated(FedcomputeError):
    """The caller presented no valid credential."""


class ResourceExhausted(FedcomputeError):
    """A size or capacity limit was hit."""


class BudgetSpent(ResourceExhausted):
    """A key service's ledger refuses a release for the task's privacy budget (marked apart from other
    RESOURCE_EXHAUSTED answers, such as gRPC's own for a message past the receive limit)."""


class StaleReleaseNumber(FailedPrecondition):
    """A key service has granted a DP release numbered as high as this one's: the worker reads the key services'
    counts again and numbers its release past the highest (marked, so that it is told from other refusals)."""


class Aborted(FedcomputeError):
    """A concurrent change won; retry the operation."""


class DataLoss(FedcomputeError):
    """Received bytes do not match what was declared; they were discarded."""


class Unavailable(FedcomputeError):
    """A dependency is down; retry later."""


class RateLimited(ResourceExhausted):
    """Too many calls from one address; the caller should wait ``retry_after_s`` before calling again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
