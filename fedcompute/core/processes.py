"""Child processes that never outlive their parent, and a restart policy for the ones that die.

``die_with_parent`` is a ``preexec_fn``: Linux's ``PR_SET_PDEATHSIG`` makes the kernel send the child SIGTERM
when its parent exits, even by SIGKILL, so a killed launcher or ``fedcompute up`` leaves no orphan worker or key
service behind. The libc function is looked up before any fork: the child then only makes one system call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
from collections.abc import Callable
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1


def parent_death_signal() -> Callable[[], None] | None:
    """A preexec function that arms SIGTERM-on-parent-death, or None where prctl is not available."""
    name = ctypes.util.find_library("c")
    try:
        prctl = ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return arm


@dataclass
class RestartBackoff:
    """Exponential backoff between restarts of a child that keeps dying, reset once it has run long enough."""

    base_s: float = 0.5
    cap_s: float = 30.0
    healthy_after_s: float = 60.0
    failures: int = 0

    def next_delay(self, ran_for_s: float) -> float:
        self.failures = 1 if ran_for_s >= self.healthy_after_s else self.failures + 1
        return float(min(self.base_s * 2 ** (self.failures - 1), self.cap_s))
