"""A simulated fleet: N devices, each with its own data shard, each on its own thread, talking gRPC only."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog

from fedcompute.clients.dataset import Split
from fedcompute.clients.device import Device, Participated, Rejected, Trust
from fedcompute.clients.examples import ShardStore
from fedcompute.clients.typed import ResourceClient, TaskAssignmentClient, UploadClient
from fedcompute.rpc.channels import open_channel
from fedcompute.rpc.tls import ClientTls

log = structlog.get_logger("fedcompute.fleet")


@dataclass
class FleetStats:
    participations: int = 0
    uploads: int = 0
    rejections: int = 0
    errors: int = 0
    refused_keys: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


class Fleet:
    def __init__(
        self,
        server_address: str,
        population: str,
        shards: list[Split],
        seed: int,
        trust: Trust,
        timeout_s: float = 30.0,
        max_sleep_s: float | None = None,
        client_version: str = "1.0.0",
        on_payload: Callable[[bytes], None] | None = None,
        collection: str = "digits",
        tls: ClientTls | None = None,
    ) -> None:
        """Each device holds one shard, as the example collection named ``collection``; ``tls``: the CA the
        devices verify the server with (None: plaintext)."""
        channel = open_channel(server_address, tls=tls)
        self._devices = [
            Device(
                device_id=f"device-{i}",
                data=shard,
                population=population,
                assignments=TaskAssignmentClient(channel, timeout_s),
                resources=ResourceClient(channel, timeout_s),
                uploads=UploadClient(channel, timeout_s),
                trust=trust,
                client_version=client_version,
                rng=random.Random(seed * 100_003 + i),
                on_payload=on_payload,
                examples=ShardStore({collection: shard}),
            )
            for i, shard in enumerate(shards)
        ]
        self._max_sleep = max_sleep_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stats = FleetStats()

    def start(self, stop_when_no_task: bool = False) -> Fleet:
        for device in self._devices:
            thread = threading.Thread(
                target=self._run, args=(device, stop_when_no_task), name=device.device_id, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, device: Device, stop_when_no_task: bool) -> None:
        while not self._stop.is_set():
            try:
                outcome = device.participate()
            except grpc.RpcError as exc:
                self.stats.count("errors")
                log.warning("device_call_failed", device=device.device_id, code=exc.code().name, detail=exc.details())
                self._stop.wait(0.5)
                continue
            if isinstance(outcome, Participated):
                self.stats.count("participations")
                if outcome.uploaded:
                    self.stats.count("uploads")
                if outcome.refused_key:
                    self.stats.count("refused_keys")
                continue
            self.stats.count("rejections")
            if stop_when_no_task and outcome.reason == "NO_ACTIVE_TASK":
                return
            self._stop.wait(self._sleep_for(outcome))

    def _sleep_for(self, rejection: Rejected) -> float:
        if self._max_sleep is None:
            return rejection.retry_after_s
        return min(rejection.retry_after_s, self._max_sleep)

    def wait(self, until: Callable[[], bool], poll_s: float = 0.5, timeout_s: float | None = None) -> bool:
        """Block until ``until()`` or every device has stopped; False on timeout."""
        waited = 0.0
        while not until() and any(t.is_alive() for t in self._threads):
            if timeout_s is not None and waited >= timeout_s:
                return False
            self._stop.wait(poll_s)
            waited += poll_s
        return True

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
