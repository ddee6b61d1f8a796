"""Differential-privacy settings of a task and their accounting (Opacus accountants).

DP-FedAvg at the user level: each round samples (by assumption) m = report_goal of N = assumed population
devices, q = m / N, one Gaussian-mechanism step per released round. ε is reported with the PRV accountant
(RDP as a cross-check). The privacy cost of adaptive clipping's noised count is folded into the noise multiplier
as TFF does: the update gets z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2), so the accounting still uses z. Noised metrics are
one more Gaussian mechanism of sensitivity 1 at the update's multiplier, folded in the same way:
z⁻² = 2·z_Δ⁻² (+ (2σ_b)⁻²), so the stored z stays the one every ledger accounts with.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache, wraps
from typing import Any

from fedcompute.core.errors import InvalidArgument

ACCOUNTANTS = ("prv", "rdp")
MAX_NOISE_MULTIPLIER = 50.0


_loading = threading.Lock()
_loader: list[threading.Thread] = []  # the one background import of this process, once started
RDP_KEPT = 1 << 15  # (q, z, order) values of Opacus' RDP kept per process: 151 orders per (q, z), a few MB at most
_rdp_kept: list[bool] = []  # set once Opacus' RDP is kept per order (guarded by _keeping)
_keeping = threading.Lock()


def _import_accountants() -> None:
    """Import Opacus' accountants (once: then a lookup) and keep its RDP values per order. Opacus' PRV accountant
    bounds its discretisation domain with two RDP evaluations, each over 151 orders, of the same (q, z)
    (``compute_safe_domain_size``); a value per order is a pure function of (q, z, order), so it is computed once
    and kept (an ``lru_cache`` over Opacus' own ``_compute_rdp``, which its ``compute_rdp`` looks up at each
    call): the second evaluation reuses the first's, and so does every later ε of the same (q, z) for another
    number of rounds (each round's release at every key service, the model updater's publish). Here a first ε
    took 0.26 -> 0.10 s and a later one 0.22 -> 0.02-0.03 s; the values are Opacus' own, bit for bit
    (tests/unit/test_privacy.py). Kept by type too (20 and 20.0 apart); arguments that cannot be kept (an array)
    go to Opacus' function as they did. An Opacus without that function is used as it is."""
    from opacus.accountants.analysis import rdp

    with _keeping:
        if not _rdp_kept and callable(getattr(rdp, "_compute_rdp", None)):
            rdp._compute_rdp = _kept_per_order(rdp._compute_rdp)
            _rdp_kept.append(True)


def _kept_per_order(compute: Callable[[Any, Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """``compute`` (Opacus' RDP at one order) with its values kept by (q, z, order); unhashable arguments are
    passed through uncached. ``__wrapped__`` is ``compute``, ``cache_info`` the memo's."""
    kept = lru_cache(maxsize=RDP_KEPT, typed=True)(compute)

    @wraps(compute)
    def rdp_at(q: Any, sigma: Any, alpha: Any) -> Any:
        try:
            hash((q, sigma, alpha))
        except TypeError:
            return compute(q, sigma, alpha)
        return kept(q, sigma, alpha)

    rdp_at.cache_info = kept.cache_info  # type: ignore[attr-defined]
    return rdp_at


def load_accountants() -> None:
    """Import Opacus' accountants now. Opacus imports torch: 8.7 s for a process without it on the loaded 2-core
    VM the benchmarks run on. A key service (which starts without torch) ran that import inside its first DP
    release, under its store's lock, where a worker's 5 s deadline ran out (all three providers at once, the first
    round of a DP task); it now imports them before taking the lock, and sooner in the background
    (:func:`load_accountants_soon`) once it holds a DP policy. An import under way in the background is waited
    for, not raced: torch is not imported by two threads at once."""
    with _loading:
        loader = _loader[0] if _loader else None
    if loader is not None:
        loader.join()
    _import_accountants()  # done already (a lookup), or raises what the background import could not do


def load_accountants_soon() -> None:
    """Start importing Opacus' accountants on a thread of its own (once per process); the caller does not wait."""
    with _loading:
        if not _loader:
            loader = threading.Thread(target=_import_accountants, name="load-accountants", daemon=True)
            loader.start()
            _loader.append(loader)


@lru_cache(maxsize=1024)
def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str = "prv") -> float:
    """ε after ``rounds`` Gaussian steps with multiplier z and sampling rate q, at δ (Opacus). A pure function of
    its arguments, kept per process: a PRV evaluation of a new (q, z) costs ~0.1 s here, another number of rounds
    of a known one 0.02-0.03 s (``_import_accountants``), and a task asks for the same value more than once (the
    operator's check and the server's at create, the publish of its last round; every task sharing a DP
    configuration)."""
    _import_accountants()
    from opacus.accountants import create_accountant

    if rounds <= 0:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def calibrate(target_epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str = "prv") -> float:
    """The smallest noise multiplier (to Opacus' tolerance) whose ε over ``rounds`` stays below the target (kept
    per process, as ``epsilon``)."""
    _import_accountants()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=rounds,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )


def update_noise_multiplier(z: float, count_stddev: float, noised_metrics: bool = False) -> float:
    """The multiplier applied to the update (and to noised metrics) once the adaptive clip count (``count_stddev``
    > 0) and the metrics took their share of the accounted multiplier ``z``."""
    if z <= 0:
        return 0.0
    count = 0.0
    if count_stddev > 0:
        if z >= 2 * count_stddev:
            raise ValueError(
                f"noise multiplier {z:.4g} must be below 2 x clipped_count_stddev ({2 * count_stddev:.4g})"
            )
        count = (2 * count_stddev) ** -2
    return float(((z**-2 - count) / (2 if noised_metrics else 1)) ** -0.5)


@dataclass(frozen=True)
class DpSpec:
    """A task's DP settings as stored (``noise_multiplier`` resolved at creation)."""

    target_epsilon: float
    target_delta: float
    assumed_population_size: int
    accountant: str = "prv"
    noise_multiplier: float = 0.0
    l2_clip_norm: float = 1.0
    adaptive_clip: bool = False
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float = 0.0
    min_clients: int = 0
    noise_metrics: bool = False  # release the devices' metrics noised (else they are left out)
    metric_loss_bound: float = 5.0  # each device's loss is clipped to [0, this] before it is summed

    def sample_rate(self, report_goal: int) -> float:
        return report_goal / self.assumed_population_size

    def count_stddev(self, report_goal: int) -> float:
        return self.clipped_count_stddev or report_goal / 20

    def update_noise(self, report_goal: int) -> float:
        count = self.count_stddev(report_goal) if self.adaptive_clip else 0.0
        return update_noise_multiplier(self.noise_multiplier, count, self.noise_metrics)

    def metric_bounds(self, metrics: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
        """Each released metric and the range [0, bound] a device's value is clipped to (empty: left out)."""
        if not self.noise_metrics:
            return ()
        return tuple(sorted((m, self.metric_loss_bound if m == "loss" else 1.0) for m in metrics))

    def resolve(self, rounds: int, report_goal: int, max_cohort: int) -> DpSpec:
        """Validate against the task and calibrate z if not given; raise ``InvalidArgument`` naming the field."""
        field = "spec.dp."
        if not self.target_epsilon > 0 or not math.isfinite(self.target_epsilon):
            raise InvalidArgument(field + "target_epsilon", f"must be > 0, got {self.target_epsilon}")
        if not 0 < self.target_delta < 1:
            raise InvalidArgument(field + "target_delta", f"must be in (0, 1), got {self.target_delta}")
        if not self.l2_clip_norm > 0:
            raise InvalidArgument(field + "l2_clip_norm", f"must be > 0, got {self.l2_clip_norm}")
        if self.assumed_population_size < max_cohort:
            raise InvalidArgument(
                field + "assumed_population_size",
                f"must be >= max_cohort ({max_cohort}), got {self.assumed_population_size}",
            )
        if self.accountant not in ACCOUNTANTS:
            raise InvalidArgument(field + "accountant", f"must be one of {', '.join(ACCOUNTANTS)}")
        if self.noise_multiplier < 0:
            raise InvalidArgument(field + "noise_multiplier", "must be >= 0 (0: calibrate from the budget)")
        if not 0 <= self.min_clients <= report_goal:
            raise InvalidArgument(field + "min_clients", f"must be in [0, report_goal ({report_goal})]")
        if not self.metric_loss_bound > 0 or not math.isfinite(self.metric_loss_bound):
            raise InvalidArgument(field + "metric_loss_bound", f"must be > 0, got {self.metric_loss_bound}")
        if not 0 < self.target_unclipped_quantile < 1 or self.clip_learning_rate < 0:
            raise InvalidArgument(field + "target_unclipped_quantile", "must be in (0, 1) with clip_learning_rate >= 0")
        q = self.sample_rate(report_goal)
        resolved = replace(self, min_clients=self.min_clients or report_goal)
        if self.noise_multiplier > 0:
            cost = epsilon(self.noise_multiplier, q, rounds, self.target_delta, self.accountant)
            if cost > self.target_epsilon:
                raise InvalidArgument(
                    field + "noise_multiplier",
                    f"contradicts the budget: {rounds} rounds at z={self.noise_multiplier:g} cost "
                    f"ε={cost:.4g} > target_epsilon {self.target_epsilon:g}",
                )
        else:
            most = epsilon(MAX_NOISE_MULTIPLIER, q, rounds, self.target_delta, self.accountant)
            if most > self.target_epsilon:
                raise InvalidArgument(
                    field + "target_epsilon",
                    f"cannot be met for {rounds} rounds: even z={MAX_NOISE_MULTIPLIER:g} costs ε={most:.4g}",
                )
            resolved = replace(resolved, noise_multiplier=calibrate(
                self.target_epsilon, self.target_delta, q, rounds, self.accountant
            ))  # fmt: skip
        if resolved.adaptive_clip:
            try:
                resolved.update_noise(report_goal)
            except ValueError as exc:
                raise InvalidArgument(field + "clipped_count_stddev", str(exc)) from None
        return resolved
