"""A task's specification and its validation.

A task's plan (``core/plans.py``) is either sent with the spec (the TaskBuilder exports the user's model) or built
from a built-in model the spec names (``core/architectures.py``), the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from fedcompute.core import plans
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.privacy import DpSpec
from fedcompute.core.versions import parse_version

PLAN_MEDIA_TYPE = plans.MEDIA_TYPE
CHECKPOINT_MEDIA_TYPE = "application/vnd.safetensors"


MAX_REPORT_GOAL = 40_000  # a round's most contributions (it closes at its goal): what one release covers (keys/)
MAX_POPULATION_CHARS = 255  # a population's name, at task creation and in every device's request (its column's width)


@dataclass(frozen=True)
class Hyperparameters:
    local_epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.1
    momentum: float = 0.0


@dataclass(frozen=True)
class TaskSpec:
    population_name: str
    model_architecture: str
    rounds: int
    report_goal: int
    max_cohort: int
    initial_weights: bytes = b""
    initial_seed: int = 0
    min_client_version: str = ""
    max_client_version: str = ""
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    server_learning_rate: float = 1.0
    dp: DpSpec | None = None
    min_clients: int = 0  # without DP; 0: the report goal (with DP, dp.min_clients rules)
    local_compute_deadline_s: int = 600
    upload_deadline_s: int = 600
    round_deadline_s: int = 3600
    traffic_weight: float = 1.0
    min_separation_rounds: int = 1
    max_round_attempts: int = 0  # 0: the server's setting
    plan: bytes = b""  # a plan v2 (the TaskBuilder's); empty: built from the built-in model_architecture
    kind: str = "training"  # or "evaluation": devices evaluate the initial model and report metrics only

    def validate(self) -> None:
        """Raise ``InvalidArgument`` naming the first bad field."""
        if not self.population_name.strip():
            raise InvalidArgument("spec.population_name", "must not be empty")
        if len(self.population_name) > MAX_POPULATION_CHARS:
            raise InvalidArgument("spec.population_name", f"must be at most {MAX_POPULATION_CHARS} characters")
        if not self.population_name.isprintable():
            raise InvalidArgument("spec.population_name", "must not hold control characters (NUL, newlines, ...)")
        if self.kind not in plans.KINDS:
            raise InvalidArgument("spec.kind", f"unknown kind {self.kind!r}; known: {', '.join(plans.KINDS)}")
        if self.kind == "evaluation" and self.dp is not None and not self.dp.noise_metrics:
            raise InvalidArgument(
                "spec.dp.noise_metrics",
                "must be set: an evaluation task under DP releases only its metrics, noised",
            )
        from fedcompute.core.architectures import ARCHITECTURES  # torch: only for those that build plans

        if not self.plan and self.model_architecture not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise InvalidArgument(
                "spec.model_architecture",
                f"unknown built-in model {self.model_architecture!r}; known: {known} (or send a plan)",
            )
        if self.rounds <= 0:
            raise InvalidArgument("spec.rounds", f"must be > 0, got {self.rounds}")
        if self.report_goal <= 0:
            raise InvalidArgument("spec.report_goal", f"must be > 0, got {self.report_goal}")
        if self.report_goal > MAX_REPORT_GOAL:
            raise InvalidArgument(
                "spec.report_goal", f"must be at most {MAX_REPORT_GOAL} (what one key release covers)"
            )
        if self.max_cohort < self.report_goal:
            raise InvalidArgument(
                "spec.max_cohort", f"must be >= report_goal ({self.report_goal}), got {self.max_cohort}"
            )
        for name in ("min_client_version", "max_client_version"):
            value = getattr(self, name)
            if value:
                try:
                    parse_version(value)
                except ValueError as exc:
                    raise InvalidArgument(f"spec.{name}", str(exc)) from None
        if (
            self.min_client_version
            and self.max_client_version
            and parse_version(self.min_client_version) > parse_version(self.max_client_version)
        ):
            raise InvalidArgument("spec.max_client_version", "must not be lower than min_client_version")
        hp = self.hyperparameters
        if hp.local_epochs <= 0:
            raise InvalidArgument("spec.hyperparameters.local_epochs", "must be > 0")
        if hp.batch_size <= 0:
            raise InvalidArgument("spec.hyperparameters.batch_size", "must be > 0")
        if not 0 < hp.learning_rate < math.inf:
            raise InvalidArgument("spec.hyperparameters.learning_rate", "must be > 0 and finite")
        if not 0 <= hp.momentum < 1:
            raise InvalidArgument("spec.hyperparameters.momentum", "must be in [0, 1)")
        if not 0 < self.server_learning_rate < math.inf:
            raise InvalidArgument("spec.server_learning_rate", "must be > 0 and finite")
        for name in ("local_compute_deadline_s", "upload_deadline_s", "round_deadline_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"spec.{name}", f"must be > 0 seconds, got {getattr(self, name)}")
        if not 0 < self.traffic_weight < math.inf:
            raise InvalidArgument("spec.traffic_weight", f"must be > 0 and finite, got {self.traffic_weight}")
        if self.max_round_attempts < 0:
            raise InvalidArgument("spec.max_round_attempts", "must be >= 0 (0: the server's setting)")
        if self.min_separation_rounds < 1:
            raise InvalidArgument("spec.min_separation_rounds", f"must be >= 1, got {self.min_separation_rounds}")
        if not 0 <= self.min_clients <= self.report_goal:
            raise InvalidArgument("spec.min_clients", f"must be in [0, report_goal ({self.report_goal})]")

    def min_clients_or_default(self) -> int:
        """Fewest contributions any release may cover (the access policy's min_clients)."""
        if self.dp is not None:
            return self.dp.min_clients or self.report_goal
        return self.min_clients or self.report_goal

    def resolved(self) -> TaskSpec:
        """The spec as stored: DP settings validated and the noise multiplier calibrated."""
        if self.dp is None:
            return self
        return replace(self, dp=self.dp.resolve(self.rounds, self.report_goal, self.max_cohort))

    def plan_bytes(self) -> bytes:
        """The plan devices download: the one sent, or the built-in model's."""
        if self.plan:
            return self.plan
        hp = self.hyperparameters
        from fedcompute.core.architectures import builtin_plan

        plan = builtin_plan(self.model_architecture, hp.local_epochs, hp.batch_size, hp.learning_rate, hp.momentum)
        if self.kind == "training":
            return plan
        return replace(plans.parse(plan), kind=self.kind).encode()
