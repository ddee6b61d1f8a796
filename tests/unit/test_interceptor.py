"""The server interceptor's per-method wrapper: built once for the handler gRPC finds, not once per call."""

from __future__ import annotations

from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from fedcompute.rpc.interceptor import ObservingInterceptor
from fedcompute.rpc.metrics import RpcMetrics


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _handler() -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


def test_a_methods_wrapper_is_built_once_per_handler_and_unknown_methods_are_not_kept() -> None:
    """gRPC asks the interceptor on every call; the wrapper (and the metrics' children it holds) is made the
    first time a method's handler is seen and handed out again after, until the server finds another handler."""
    interceptor = ObservingInterceptor(RpcMetrics.create("probe", CollectorRegistry()))
    first, second = _handler(), _handler()
    details = _Details("/fedcompute.v1.Probe/Call")
    wrapped = interceptor.intercept_service(lambda _: first, details)
    assert wrapped is not None
    assert wrapped is not first
    assert interceptor.intercept_service(lambda _: first, details) is wrapped
    rebuilt = interceptor.intercept_service(lambda _: second, details)  # another handler for the method
    assert rebuilt is not None
    assert rebuilt is not wrapped
    assert interceptor.intercept_service(lambda _: second, details) is rebuilt
    assert interceptor.intercept_service(lambda _: None, _Details("/fedcompute.v1.Probe/Missing")) is None
    assert set(interceptor._wrapped) == {"/fedcompute.v1.Probe/Call"}
