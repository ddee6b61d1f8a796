"""Prometheus metrics, created per process by the composition root (never at import time).

One registry per process holds the default collectors (process, platform, garbage collector), a
``fedcompute_<component>_build_info`` per component living in the process, and each component's own metrics;
it is served over HTTP on ``FEDCOMPUTE_METRICS_PORT``. Names follow ``fedcompute_<component>_<thing>_<unit>``;
labels are bounded (service, method, code, reason, result), never device ids.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from fedcompute.core.settings import SettingError

RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def process_registry() -> CollectorRegistry:
    """A registry for this process with the default collectors (a fresh one per process: tests start many)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def announce(registry: CollectorRegistry, component: str, version: str) -> None:
    """``fedcompute_<component>_build_info``: which code a scraped process runs."""
    info = Info(f"fedcompute_{component}_build", f"The {component} component's version.", registry=registry)
    info.info({"version": version, "python": platform.python_version()})


def serve_metrics(registry: CollectorRegistry, host: str, port: int, setting: str = "metrics_port") -> Any:
    """Expose ``/metrics`` on ``host:port`` (a daemon thread); a busy port names the setting. Returns the HTTP
    server (``shutdown()`` stops it)."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise SettingError(setting, f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return server


@dataclass(frozen=True)
class RpcMetrics:
    """Every RPC a server handles: started, handled by status code, latency, in flight; by service and method."""

    registry: CollectorRegistry
    started: Counter
    handled: Counter
    latency: Histogram
    in_flight: Gauge

    @classmethod
    def create(cls, component: str, registry: CollectorRegistry | None = None) -> RpcMetrics:
        reg = registry if registry is not None else process_registry()
        prefix = f"fedcompute_{component}"
        return cls(
            reg,
            Counter(
                f"{prefix}_rpcs_started", "RPCs received, by service and method.", ["service", "method"], registry=reg
            ),
            Counter(
                f"{prefix}_rpcs_handled",
                "RPCs completed, by service, method and gRPC status code.",
                ["service", "method", "code"],
                registry=reg,
            ),
            Histogram(
                f"{prefix}_rpc_duration_seconds",
                "Time to handle an RPC, by service and method.",
                ["service", "method"],
                buckets=RPC_BUCKETS,
                registry=reg,
            ),
            Gauge(
                f"{prefix}_rpcs_in_flight",
                "RPCs being handled now, by service and method.",
                ["service", "method"],
                registry=reg,
            ),
        )
