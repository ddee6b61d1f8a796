"""Client side: channels (TLS from settings, a request id on every call), and retries for idempotent calls
(tenacity, never a hand loop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import structlog
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

from fedcompute.core.clock import RandomIds
from fedcompute.core.settings import Settings
from fedcompute.rpc.tls import ClientTls, client_tls

T = TypeVar("T")

RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


# gRPC waits 1 s after a refused connection, then 1.6x longer each time up to 120 s (jittered): a worker whose
# server was down for two minutes (a rollout) could wait two more before trying again. Ours start at 0.25 s and
# stop growing at 5 s, so a restarted component is reached within seconds of serving again.
RECONNECT_BACKOFF = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 5000))

REQUEST_ID = "x-request-id"
_ids = RandomIds()


def current_request_id() -> str:
    """The request id of the RPC (or job) this thread works for, bound in structlog's context; else a new one."""
    bound = structlog.contextvars.get_contextvars().get("request_id")
    return str(bound) if bound else _ids.new_id("req")


class _RequestIdInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Sends ``x-request-id`` on every call, so one id follows a request across components."""

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        if any(m[0] == REQUEST_ID for m in metadata):  # the caller chose its own
            return details
        metadata.append((REQUEST_ID, current_request_id()))
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = tuple(metadata)
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def open_channel(
    address: str,
    max_message_bytes: int = 128 * 1024 * 1024,
    tls: ClientTls | None = None,
    own_connection: bool = False,
) -> grpc.Channel:
    """A channel to ``address``: TLS when ``tls`` is given (verifying the server against its CA, presenting this
    process's certificate to mTLS ports), plaintext otherwise. Channels of one process to one address share a
    connection (gRPC's global subchannel pool) unless ``own_connection``: a process playing many devices gives
    each its own, as separate devices have, so that replicas behind one port or a load balancer each get some."""
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *RECONNECT_BACKOFF,
    ]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    channel = (
        grpc.secure_channel(address, tls.credentials(), options=options)
        if tls is not None
        else grpc.insecure_channel(address, options=options)
    )
    return grpc.intercept_channel(channel, _RequestIdInterceptor())


def channel_for(settings: Settings, address: str) -> grpc.Channel:
    """A channel as this process's settings say: TLS from its CA and certificate, or plaintext if enabled."""
    return open_channel(address, settings.max_message_bytes, client_tls(settings))


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
