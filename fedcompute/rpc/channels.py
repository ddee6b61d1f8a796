"""Client side: channels, deadlines, and retries for idempotent calls (tenacity, never a hand loop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

T = TypeVar("T")

RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


def open_channel(address: str, max_message_bytes: int = 128 * 1024 * 1024) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in RETRYABLE


def idempotent(attempts: int = 5) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Retry an idempotent call on UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED with jittered backoff."""
    return retry(
        retry=retry_if_exception(_is_retryable),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.05, max=2.0),
        reraise=True,
    )
