"""Child processes that never outlive their parent, and a restart policy for the ones that die.

Linux's ``PR_SET_PDEATHSIG`` makes the kernel send a child SIGTERM when its parent exits, even by SIGKILL, so a
killed launcher or ``fedcompute up`` leaves no orphan worker or key service behind. The child arms it itself:
:func:`die_with_parent` wraps a command in a few lines of Python that call ``prctl``, check that the parent is
still the one that started it (else exit: it died before the signal was armed), and ``exec`` the command, which
keeps the setting and the pid. No ``preexec_fn``: running Python between ``fork`` and ``exec`` in a process with
threads (gRPC's, torch's) can deadlock the child before it ever starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from fedcompute.core.settings import SECRET_SETTINGS, Settings

log = structlog.get_logger("fedcompute.processes")

PR_SET_PDEATHSIG = 1
_ARM_AND_EXEC = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl({option}, {signal}, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent(command: Sequence[str]) -> list[str]:
    """``command`` run so that it gets SIGTERM when this process exits (as is, where prctl does not exist)."""
    if not sys.platform.startswith("linux"):
        return list(command)
    wrapper = _ARM_AND_EXEC.format(option=PR_SET_PDEATHSIG, signal=int(signal.SIGTERM))
    return [sys.executable, "-I", "-S", "-c", wrapper, str(os.getpid()), *command]


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


class ChildProcess:
    """A `fedcompute serve ...` child of `up`: dies with it, and is restarted if it dies first."""

    def __init__(self, args: list[str], env: dict[str, str], name: str) -> None:
        self._args = args
        self._env = env
        self.name = name
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildProcess:
        command = [sys.executable, "-m", "fedcompute.cli", *self._args]
        self._process = subprocess.Popen(die_with_parent(command), env=self._env)
        return self

    def restart_if_dead(self) -> bool:
        if self._process is None or self._process.poll() is None:
            return False
        log.warning("child_restarting", child=self.name, code=self._process.returncode)
        self.start()
        return True

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()


def child_env(settings: Settings, **secrets: str) -> dict[str, str]:
    """Environment of a child process: these settings without any secret, plus exactly the secrets it needs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCOMPUTE_")}
    public = settings.to_env().items()
    env.update({k: v for k, v in public if k.removeprefix("FEDCOMPUTE_").lower() not in SECRET_SETTINGS})
    env.update({f"FEDCOMPUTE_{name.upper()}": value for name, value in secrets.items()})
    return env
