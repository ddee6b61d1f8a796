"""Data for simulated devices: a held-out split and non-IID device shards of a bundled scikit-learn data set.

``digits``: the 8x8 handwritten digits (1797 images, 10 classes), features scaled to ``[0, 1]`` as float32, int64
labels. ``breast_cancer``: the Wisconsin diagnostic data (569 examples, 30 features, binary), features standardised
as float32, float32 0/1 labels (for BCE). No download. Every function here is deterministic for its ``seed``:
randomness comes only from a :class:`numpy.random.Generator` built from that seed, never from global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_breast_cancer, load_digits

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64] | npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.intp]

NUM_FEATURES = 64
NUM_CLASSES = 10
MIN_EXAMPLES_PER_DEVICE = 10
"""Each device shard gets at least this many examples, unless there are too few examples to go round."""


@dataclass(frozen=True, eq=False)
class Split:
    """A set of examples: ``features`` (float32, N x F) and ``labels`` (N: int64 classes or float32 targets)."""

    features: FloatArray
    labels: LabelArray

    def __post_init__(self) -> None:
        if self.features.ndim < 2:
            raise ValueError(f"features must have shape (N, ...), got {self.features.shape}")
        if self.labels.ndim < 1 or self.labels.shape[0] != self.features.shape[0]:
            raise ValueError(f"labels must have shape ({self.features.shape[0]}, ...), got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: IndexArray) -> Split:
        """The examples at ``indices`` (copied), in that order."""
        return Split(features=self.features[indices], labels=self.labels[indices])


@lru_cache(maxsize=1)
def _all_digits() -> Split:
    """The whole digits data set, scaled to [0, 1]; loaded on first use and kept read-only."""
    bunch = load_digits()
    features: FloatArray = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    labels: LabelArray = np.asarray(bunch.target, dtype=np.int64)
    features.setflags(write=False)
    labels.setflags(write=False)
    return Split(features=features, labels=labels)


@lru_cache(maxsize=1)
def _all_breast_cancer() -> Split:
    """The breast-cancer data set, each feature standardised over the whole set (a public, fixed transform)."""
    bunch = load_breast_cancer()
    raw = np.asarray(bunch.data, dtype=np.float64)
    features: FloatArray = ((raw - raw.mean(axis=0)) / raw.std(axis=0)).astype(np.float32)
    labels: LabelArray = np.asarray(bunch.target, dtype=np.float32)
    features.setflags(write=False)
    labels.setflags(write=False)
    return Split(features=features, labels=labels)


COLLECTIONS = {"digits": _all_digits, "breast_cancer": _all_breast_cancer}


def train_test_split(seed: int, test_fraction: float = 0.25, collection: str = "digits") -> tuple[Split, Split]:
    """Split a collection into (train, test), stratified by label and deterministic for ``seed``.

    Each class contributes ``round(test_fraction * class_size)`` examples to the test split. Both splits are
    returned sorted by original example index.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = COLLECTIONS[collection]()
    rng = np.random.default_rng(seed)
    test_parts: list[IndexArray] = []
    for label in np.unique(data.labels):
        members = rng.permutation(np.flatnonzero(data.labels == label))
        test_parts.append(members[: round(test_fraction * members.size)])
    is_test = np.zeros(len(data), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    return data.subset(np.flatnonzero(~is_test)), data.subset(np.flatnonzero(is_test))


def _dirichlet_assignment(labels: LabelArray, num_devices: int, alpha: float, rng: np.random.Generator) -> IndexArray:
    """Device index per example: each class is divided among devices in Dirichlet(alpha) proportions."""
    assignment = np.zeros(labels.size, dtype=np.intp)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.intp)
        for device, part in enumerate(np.split(members, cuts)):
            assignment[part] = device
    return assignment


def _top_up(assignment: IndexArray, num_devices: int, minimum: int, rng: np.random.Generator) -> None:
    """Move random examples from the largest shards to shards below ``minimum`` until none is (in place).

    Terminates because ``minimum * num_devices`` never exceeds the number of examples, so while some shard is
    short the largest one holds more than ``minimum``.
    """
    counts = np.bincount(assignment, minlength=num_devices)
    while counts.min() < minimum:
        needy = int(np.argmin(counts))
        donor = int(np.argmax(counts))
        moved = min(minimum - int(counts[needy]), int(counts[donor]) - minimum)
        chosen = rng.choice(np.flatnonzero(assignment == donor), size=moved, replace=False)
        assignment[chosen] = needy
        counts[needy] += moved
        counts[donor] -= moved


def non_iid_shards(train: Split, num_devices: int, seed: int, alpha: float = 0.5) -> list[Split]:
    """Partition ``train`` into ``num_devices`` disjoint label-skewed shards, deterministic for ``seed``.

    Each class is spread over the devices in Dirichlet(``alpha``) proportions (smaller ``alpha``: more skew). Shards
    then get topped up to ``min(MIN_EXAMPLES_PER_DEVICE, len(train) // num_devices)`` examples by moving random
    examples over from the largest shards. Every example lands on exactly one device.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    if num_devices > len(train):
        raise ValueError(f"cannot give {num_devices} devices an example each from {len(train)} examples")
    if not alpha > 0.0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    assignment = _dirichlet_assignment(train.labels, num_devices, alpha, rng)
    _top_up(assignment, num_devices, min(MIN_EXAMPLES_PER_DEVICE, len(train) // num_devices), rng)
    return [train.subset(np.flatnonzero(assignment == device)) for device in range(num_devices)]
