"""Prometheus metrics, created per process by the composition root (never at import time)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


@dataclass(frozen=True)
class RpcMetrics:
    """Counters and latency of every RPC a server handles, labelled by service, method and status code."""

    registry: CollectorRegistry
    handled: Counter
    latency: Histogram

    @classmethod
    def create(cls, component: str, registry: CollectorRegistry | None = None) -> RpcMetrics:
        reg = registry or CollectorRegistry()
        handled = Counter(
            f"fedcompute_{component}_rpcs_handled",
            "RPCs completed, by service, method and gRPC status code.",
            ["service", "method", "code"],
            registry=reg,
        )
        latency = Histogram(
            f"fedcompute_{component}_rpc_duration_seconds",
            "Time to handle an RPC, by service and method.",
            ["service", "method"],
            registry=reg,
        )
        return cls(reg, handled, latency)

    def serve_http(self, host: str, port: int) -> None:
        """Expose ``/metrics`` on ``host:port`` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
