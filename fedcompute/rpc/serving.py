"""Server factory: one interceptor for errors, logs and metrics; health and reflection on every server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedcompute.core.clock import RandomIds
from fedcompute.core.errors import FedcomputeError
from fedcompute.rpc.errors import status_for, trailing_metadata_for
from fedcompute.rpc.metrics import RpcMetrics

log = structlog.get_logger("fedcompute.rpc")
_ids = RandomIds()
REQUEST_ID = "x-request-id"

Behavior = Callable[..., Any]


class ObservingInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Maps domain errors to status codes, logs one line per RPC and counts it in the metrics."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full: str = handler_call_details.method
        service, _, method = full.lstrip("/").rpartition("/")
        service = service.rsplit(".", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(handler.unary_unary, service, method, False),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap(handler.unary_stream, service, method, True),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(handler.stream_unary, service, method, False),
                handler.request_deserializer,
                handler.response_serializer,
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._wrap(handler.stream_stream, service, method, True),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _wrap(self, behavior: Behavior, service: str, method: str, streaming: bool) -> Behavior:
        if streaming:

            def stream_call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started, bound = self._start(context, service, method)
                try:
                    yield from behavior(request, context)
                except FedcomputeError as exc:
                    self._abort(context, exc, bound)
                except Exception as exc:
                    self._internal(context, exc, bound)
                finally:
                    self._finish(context, service, method, started, bound)

            return stream_call

        def unary_call(request: Any, context: grpc.ServicerContext) -> Any:
            started, bound = self._start(context, service, method)
            try:
                return behavior(request, context)
            except FedcomputeError as exc:
                self._abort(context, exc, bound)
            except Exception as exc:
                self._internal(context, exc, bound)
            finally:
                self._finish(context, service, method, started, bound)

        return unary_call

    def _start(self, context: grpc.ServicerContext, service: str, method: str) -> tuple[float, Any]:
        metadata = dict(context.invocation_metadata() or ())
        request_id = metadata.get(REQUEST_ID) or _ids.new_id("req")
        return time.perf_counter(), log.bind(request_id=request_id, service=service, method=method)

    def _abort(self, context: grpc.ServicerContext, exc: FedcomputeError, bound: Any) -> None:
        code = status_for(exc)
        bound.info("rpc_refused", code=code.name, reason=exc.public_message)
        trailing = trailing_metadata_for(exc)
        if trailing:
            context.set_trailing_metadata(trailing)
        context.abort(code, exc.public_message)

    def _internal(self, context: grpc.ServicerContext, exc: Exception, bound: Any) -> None:
        """An exception no handler mapped: the caller gets a generic message and an error id, never the
        exception's text (SQL, host names); the traceback goes to the log under that id."""
        if _aborted(context):
            raise exc  # context.abort() already set the status; this is its own exception unwinding
        error_id = _ids.new_id("err")
        code = grpc.StatusCode.UNAVAILABLE if _unreachable(exc) else grpc.StatusCode.INTERNAL
        bound.error("rpc_failed", code=code.name, error_id=error_id, exc_info=exc)
        what = (
            "a dependency of this service is unavailable; retry later"
            if code == grpc.StatusCode.UNAVAILABLE
            else ("internal error")
        )
        context.abort(code, f"{what} (error id {error_id}; operators find the details in the service log)")

    def _finish(self, context: grpc.ServicerContext, service: str, method: str, started: float, bound: Any) -> None:
        elapsed = time.perf_counter() - started
        code_obj = context.code() if hasattr(context, "code") else None
        code = code_obj.name if isinstance(code_obj, grpc.StatusCode) else "OK"
        self._metrics.handled.labels(service, method, code).inc()
        self._metrics.latency.labels(service, method).observe(elapsed)
        bound.info("rpc_handled", code=code, ms=round(elapsed * 1000, 2))


def _aborted(context: grpc.ServicerContext) -> bool:
    code = context.code() if hasattr(context, "code") else None
    return isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK


def _unreachable(exc: BaseException) -> bool:
    """A database or network dependency that cannot be reached (duck-typed: rpc does not import sqlalchemy)."""
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    return bool(names & {"OperationalError", "InterfaceError", "ConnectionError", "ConnectionRefusedError"})


@dataclass
class GrpcServer:
    """A started gRPC server, the port it bound and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    services: list[str] = field(default_factory=list)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.services]:
            self.health.set(name, status)

    def stop(self, grace: float = 1.0) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()


def build_grpc_server(
    address: str,
    registrations: Sequence[tuple[Callable[[Any, grpc.Server], None], Any, str]],
    metrics: RpcMetrics,
    threads: int,
    max_message_bytes: int,
    reuse_port: bool = False,
) -> GrpcServer:
    """Create, register and start a server: (add_XServicer_to_server, servicer, full service name) triples."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
        interceptors=[ObservingInterceptor(metrics)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    names = []
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC server to {address}")
    server.start()
    started = GrpcServer(server, port, health_servicer, names)
    started.set_serving(True)
    return started
