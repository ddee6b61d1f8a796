"""The one server interceptor every fedcompute gRPC server runs: domain errors mapped to status codes, a log line
and the metrics of each RPC, request ids, device rate limits; unary requests decoded inside the call."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from fedcompute.core.clock import RandomIds
from fedcompute.core.errors import FedcomputeError, InvalidArgument
from fedcompute.rpc.channels import REQUEST_ID, current_request_id
from fedcompute.rpc.errors import (
    MAX_MESSAGE_BYTES,
    one_line,
    refused_data,
    status_for,
    trailing_metadata_for,
    unreachable,
)
from fedcompute.rpc.limits import AddressRateLimiter
from fedcompute.rpc.metrics import RpcMetrics

log = structlog.get_logger("fedcompute.rpc")
_ids = RandomIds()

Behavior = Callable[..., Any]


MAX_WRAPPED_METHODS = 1024  # methods whose wrapped handler the interceptor keeps (a server registers a few dozen)


# a handler's kinds: (its attribute, gRPC's factory, whether it streams responses, whether its request is decoded
# inside the call: unary requests only)
_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler[Any, Any]], bool, bool], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False, True),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, True, True),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, False, False),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True, False),
)


class _MethodMetrics:
    """One method's children of the RPC metrics, looked up once: ``labels()`` takes its metric's lock and builds
    the key on every call, five times per RPC (started, in flight twice, handled, latency)."""

    __slots__ = ("_by_code", "_handled", "_method", "_service", "in_flight", "latency", "started")

    def __init__(self, metrics: RpcMetrics, service: str, method: str) -> None:
        self.started = metrics.started.labels(service, method)
        self.in_flight = metrics.in_flight.labels(service, method)
        self.latency = metrics.latency.labels(service, method)
        self._handled, self._service, self._method = metrics.handled, service, method
        self._by_code: dict[str, Counter] = {}  # gRPC's status codes: a few at most

    def handled(self, code: str) -> Counter:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._handled.labels(self._service, self._method, code)
        return child


class ObservingInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Maps domain errors to status codes, logs one line per RPC and counts it in the metrics."""

    def __init__(
        self, metrics: RpcMetrics, limiter: AddressRateLimiter | None = None, limited: frozenset[str] = frozenset()
    ) -> None:
        self._metrics = metrics
        self._limiter = limiter
        self._limited = limited
        # method -> (the handler gRPC found, ours around it): gRPC asks the interceptor on every call, and the
        # servicer's handler for a method is the same object each time; only methods the server knows get here
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The method's handler wrapped (see the class), built once per method and handler: every call of the
        method then costs one dictionary look-up here, and its metrics' children are looked up once too."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full: str = handler_call_details.method
        known = self._wrapped.get(full)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap_handler(handler, full)
        if len(self._wrapped) < MAX_WRAPPED_METHODS:
            self._wrapped[full] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, handler: grpc.RpcMethodHandler[Any, Any], full: str) -> grpc.RpcMethodHandler[Any, Any]:
        qualified, _, method = full.lstrip("/").rpartition("/")
        service = qualified.rsplit(".", 1)[-1]
        limiter = self._limiter if qualified in self._limited else None
        # a unary request is decoded inside the call, not by gRPC: a message protobuf cannot parse (a string that
        # is not UTF-8, cut short) is then INVALID_ARGUMENT, counted and logged, where gRPC answered INTERNAL
        for kind, make, streaming, decoded_here in _KINDS:
            behavior = getattr(handler, kind)
            if behavior:
                deserialize = handler.request_deserializer
                if decoded_here:
                    behavior, deserialize = _decoded(behavior, deserialize), None
                return make(self._wrap(behavior, service, method, streaming, limiter), deserialize,
                            handler.response_serializer)  # fmt: skip
        raise ValueError(f"{full}: a method handler with no behavior")

    def _wrap(
        self, behavior: Behavior, service: str, method: str, streaming: bool, limiter: AddressRateLimiter | None
    ) -> Behavior:
        counted = _MethodMetrics(self._metrics, service, method)
        if streaming:

            def stream_call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with self._observed(context, service, method, counted, limiter):
                    yield from behavior(request, context)

            return stream_call

        def unary_call(request: Any, context: grpc.ServicerContext) -> Any:
            with self._observed(context, service, method, counted, limiter):
                return behavior(request, context)

        return unary_call

    @contextmanager
    def _observed(
        self,
        context: grpc.ServicerContext,
        service: str,
        method: str,
        counted: _MethodMetrics,
        limiter: AddressRateLimiter | None,
    ) -> Iterator[None]:
        """One call: counted, rate limited, its errors mapped to status codes, logged and timed."""
        started, bound, tokens = self._start(context, service, method, counted)
        try:
            if limiter is not None:
                limiter.admit(context.peer())
            yield
        except FedcomputeError as exc:
            self._abort(context, exc, bound)
        except Exception as exc:
            self._internal(context, exc, bound)
        finally:
            self._finish(context, counted, started, bound, tokens)

    def _start(
        self, context: grpc.ServicerContext, service: str, method: str, counted: _MethodMetrics
    ) -> tuple[float, Any, Any]:
        """Count the call, and take the caller's request id (or make one): bound into the log context for every
        line logged while handling it, sent on by the typed clients to other components, returned to the caller
        in the trailing metadata. Trailers travel in the batch that ends the call, with its status; initial
        metadata sent here would be a batch of its own, answered by a completion-queue event of its own: 7-8 % of
        the server's GIL time under 64 callers checking in (py-spy)."""
        counted.started.inc()
        counted.in_flight.inc()
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get(REQUEST_ID) or _ids.new_id("req"))[:128]
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        context.set_trailing_metadata(((REQUEST_ID, request_id),))
        return time.perf_counter(), log.bind(service=service, method=method), tokens

    def _abort(self, context: grpc.ServicerContext, exc: FedcomputeError, bound: Any) -> None:
        code = status_for(exc)
        message = exc.public_message
        if len(message.encode()) > MAX_MESSAGE_BYTES:  # it may quote the caller's value: past gRPC's metadata
            # limit (the message travels percent-encoded, up to 3 bytes a byte), the client got RESOURCE_EXHAUSTED
            message = message.encode()[: MAX_MESSAGE_BYTES - 10].decode(errors="ignore") + " ... (cut)"
        bound.info("rpc_refused", code=code.name, reason=message)
        trailing = trailing_metadata_for(exc)
        if trailing:  # replaces the trailers _start set: the request id goes again with them
            context.set_trailing_metadata(((REQUEST_ID, current_request_id()), *trailing))
        context.abort(code, message)

    def _internal(self, context: grpc.ServicerContext, exc: Exception, bound: Any) -> None:
        """An exception no handler mapped: the caller gets a generic message and an error id, never the
        exception's text (SQL, host names); the traceback goes to the log under that id."""
        if _aborted(context):
            raise exc  # context.abort() already set the status; this is its own exception unwinding
        if isinstance(exc, grpc.RpcError) and not context.is_active():
            # the call was cancelled (by its client, its deadline, or ``rpc.idle``) while the handler read its
            # requests: nothing can be sent; gRPC knows this error as its own and ends the call without a trace
            bound.info("rpc_cancelled")
            raise exc
        if refused_data(exc):  # the caller's value, not our fault: nothing was written (the statement failed)
            line = one_line(exc).split(": ", 1)[-1]
            self._abort(context, InvalidArgument("request", f"a value cannot be stored ({line})"), bound)
        error_id = _ids.new_id("err")
        code = grpc.StatusCode.UNAVAILABLE if unreachable(exc) else grpc.StatusCode.INTERNAL
        bound.error("rpc_failed", code=code.name, error_id=error_id, exc_info=exc)
        what = (
            "a dependency of this service is unavailable; retry later"
            if code == grpc.StatusCode.UNAVAILABLE
            else ("internal error")
        )
        context.abort(code, f"{what} (error id {error_id}; operators find the details in the service log)")

    def _finish(
        self, context: grpc.ServicerContext, counted: _MethodMetrics, started: float, bound: Any, tokens: Any
    ) -> None:
        elapsed = time.perf_counter() - started
        counted.in_flight.dec()
        code_obj = _status(context)
        code = code_obj.name if code_obj is not None else "OK" if context.is_active() else "CANCELLED"
        counted.handled(code).inc()
        counted.latency.observe(elapsed)
        bound.info("rpc_handled", code=code, ms=round(elapsed * 1000, 2))
        structlog.contextvars.reset_contextvars(**tokens)


def _decoded(behavior: Behavior, decode: Callable[[bytes], Any] | None) -> Behavior:
    """``behavior`` called with its request decoded by ``decode`` (as gRPC would have), a message that does not
    decode refused as ``InvalidArgument``."""
    if decode is None:
        return behavior

    def call(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = decode(raw)
        except DecodeError:
            raise InvalidArgument("request", "is not a valid protobuf message of this method") from None
        return behavior(request, context)

    return call


def _status(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status the handler set (``abort``, ``set_code``), if any."""
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


def _aborted(context: grpc.ServicerContext) -> bool:
    code = _status(context)
    return code is not None and code != grpc.StatusCode.OK
