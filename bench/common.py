"""What every benchmark shares: interleaved samples and their summary, the machine, a Postgres database of its
own, suite settings, and the load generator process that plays the devices."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import create_engine, text

from fedcompute.clients.typed import KeyClient
from fedcompute.core.secrets import key_admin_token
from fedcompute.core.settings import Settings
from fedcompute.rpc.channels import channel_for
from fedcompute.suite import Suite
from fedcompute.v1 import key_pb2

ADMIN_URL = os.environ.get("FEDCOMPUTE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@dataclass(frozen=True)
class Mode:
    """How long and how often: full (`make bench`) or quick (`--quick`, a smoke run)."""

    pairs: int
    seconds: float
    quick: bool
    aggregator_device: str = "cpu"  # where the aggregation benchmark also sums, beside the CPU (cuda, cuda:N)


@dataclass
class Result:
    """One benchmark row: a metric of the product against the same metric of its limit (higher is better unless
    ``lower_is_better``); ``notes`` says what was measured."""

    name: str
    metric: str
    unit: str
    product: list[float]
    limit: list[float] | None = None
    lower_is_better: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "metric": self.metric, "unit": self.unit, "product": summary(self.product),
            "notes": self.notes, **self.extra,
        }  # fmt: skip
        if self.limit is not None:
            out["limit"] = summary(self.limit)
            out["ratio_product_over_limit"] = ratio(self.product, self.limit)
        return out


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": [round(s, 4) for s in samples],
    }


def ratio(product: list[float], limit: list[float]) -> float:
    return round(statistics.median(product) / statistics.median(limit), 3) if statistics.median(limit) else 0.0


def interleave(pairs: int, *sides: Callable[[], Any]) -> list[list[Any]]:
    """A, B, A, B, ... (or A, B, C, ...): drift of the machine (heat, other load) hits every side alike."""
    out: list[list[Any]] = [[] for _ in sides]
    for _ in range(pairs):
        for samples, side in zip(out, sides, strict=True):
            samples.append(side())
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


def machine(gpu: bool = False) -> dict[str, Any]:
    """What the numbers were measured on; the GPU's name only when one is used (naming it starts CUDA)."""
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if gpu else None,
    }


def suite_settings(workdir: Path, database_url: str, **overrides: object) -> Settings:
    """In-process suite for benchmarks: plaintext loopback, no device rate limit, no metrics or health ports; the
    production poll interval (1 s: work made in the suite wakes its taker, see docs/architecture.md)."""
    values: dict[str, object] = {
        "workdir": workdir, "database_url": database_url, "server_port": 0, "key_service_port": 0,
        "verifier_port": 0, "poll_interval_s": 1.0, "retry_delay_min_s": 0.05, "retry_delay_max_s": 0.2,
        "log_json": False, "log_level": "ERROR", "key_service_processes": False, "plaintext": True,
        "health_port": 0, "metrics_port": 0, "device_rate_per_s": 0.0,
    }  # fmt: skip
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def create_task(suite: Suite, spec: Any) -> Any:
    """As the operator (``Suite.create_task``), then wait for the dealer's key ceremony for its population."""
    task = suite.create_task(spec)
    keys = KeyClient(channel_for(suite.settings, suite.key_addresses[0]), 20.0, key_admin_token(suite.settings))
    request = key_pb2.GetPublicKeysRequest(population_name=spec.population_name)
    deadline = time.monotonic() + 60
    while not keys.get_public_keys(request).keys:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no key for {spec.population_name} after 60 s")
        time.sleep(0.02)
    return task


@contextmanager
def postgres_database() -> Iterator[str]:
    """A database of our own on the Postgres server (FEDCOMPUTE_TEST_POSTGRES_URL), dropped afterwards."""
    name = f"fedcompute_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class LoadGenerator:
    """The devices, in a process of their own (bench/loadgen.py) so that they do not share the servers' GIL:
    one JSON command per line in, one JSON result per line out."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self._process.pid

    def run(self, **command: Any) -> dict[str, Any]:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited ({self._process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"load generator: {answer['error']}")
        return answer

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(timeout=30)

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
