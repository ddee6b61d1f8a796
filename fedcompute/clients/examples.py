"""The example store a simulated device reads its training examples through (ODP's example-store interface).

A plan's example selector names a collection and opaque criteria; the store answers with the device's examples
for it, or ``None`` when the device holds no such collection (the device then reports NOT_ELIGIBLE).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedcompute.clients.dataset import Split
from fedcompute.core.plans import ExampleSelector


class ExampleStore(Protocol):
    def select(self, selector: ExampleSelector) -> Split | None: ...


@dataclass(frozen=True)
class ShardStore:
    """A device's shards by collection name. Criteria understood: ``max_examples`` (the first N)."""

    shards: Mapping[str, Split]

    def select(self, selector: ExampleSelector) -> Split | None:
        data = self.shards.get(selector.collection)
        if data is None:
            return None
        limit = selector.criteria.get("max_examples", "")
        if limit.isdigit() and int(limit) < len(data):
            return data.subset(np.arange(int(limit)))
        return data
