"""Device protection at the edge: per-address rate limits on device RPCs.

A token bucket per client address (the transport peer, without its port), ``rate_per_s`` refilled up to
``burst``. Over the limit, the call is refused with RESOURCE_EXHAUSTED and ``grpc-retry-pushback-ms`` (gRPC's own
retry pushback) saying when a token will be there again. Behind a load balancer the peer is the balancer: give
the limit to the balancer there, or raise it here; forwarded-for headers are not trusted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from fedcompute.core.errors import RateLimited

MAX_ADDRESSES = 100_000  # least recently seen addresses are forgotten beyond this (a full bucket on return)


def peer_address(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` → ``10.0.0.7``; ``ipv6:[::1]:5000`` → ``[::1]``; anything else as it is."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


class AddressRateLimiter:
    def __init__(self, rate_per_s: float, burst: int, now: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._now = now
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)
        self._lock = threading.Lock()

    def admit(self, peer: str) -> None:
        """Take a token for ``peer``'s address or raise ``RateLimited`` with the wait until the next one."""
        if self._rate <= 0:
            return
        address = peer_address(peer)
        now = self._now()
        with self._lock:
            tokens, at = self._buckets.pop(address, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            admitted = tokens >= 1.0
            if admitted:
                tokens -= 1.0
            self._buckets[address] = (tokens, now)
            while len(self._buckets) > MAX_ADDRESSES:
                self._buckets.popitem(last=False)
        if not admitted:
            wait = (1.0 - tokens) / self._rate
            raise RateLimited(
                f"too many requests from this address (limit {self._rate:g}/s); retry in {wait:.2f} s", wait
            )
