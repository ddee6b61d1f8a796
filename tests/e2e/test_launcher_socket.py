"""The launcher's socket gives evidence only to the worker it started, not to other processes of the same user."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.attestation.evidence import LOCAL_HWMODEL, LocalEvidenceHandler
from fedcompute.attestation.launcher import Launcher, request_evidence
from fedcompute.core.clock import FakeClock

MEASUREMENT = "sha256:" + "ab" * 32

# The stand-in worker: asks for evidence over the socket it was given, hands it to the test, stays alive.
CHILD = """
import os, sys, time
from pathlib import Path
from fedcompute.attestation.launcher import request_evidence
out = Path(sys.argv[1])
evidence = request_evidence(Path(os.environ["FEDCOMPUTE_ATTESTER_SOCKET"]), ["child-nonce", "child-binding"])
out.with_suffix(".tmp").write_text(evidence)
out.with_suffix(".tmp").replace(out)
time.sleep(30)
"""

# Another process of the same user that finds the socket.
STRANGER = """
import sys
from pathlib import Path
from fedcompute.attestation.launcher import request_evidence
try:
    evidence = request_evidence(Path(sys.argv[1]), ["stranger-nonce", "stranger-binding"])
except RuntimeError as exc:
    print("refused:", exc)
else:
    print("evidence:", evidence)
"""


class Running:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.ca = ec.generate_private_key(ec.SECP256R1())
        self.socket = tmp_path / "l.sock"
        self.out = tmp_path / "child-evidence.jwt"
        self.launcher = Launcher(self.socket, self.ca, MEASUREMENT, self.clock).serve()
        self.child = self.launcher.start_worker(dict(os.environ), [sys.executable, "-c", CHILD, str(self.out)])

    def child_evidence(self, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.out.exists():
            assert self.child.poll() is None, f"the stand-in worker exited with {self.child.returncode}"
            assert time.monotonic() < deadline, "the stand-in worker got no evidence in time"
            time.sleep(0.05)
        return self.out.read_text()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    assert len(str(tmp_path / "l.sock")) < 100, "UNIX socket paths are limited to 107 bytes"
    running = Running(tmp_path)
    try:
        yield running
    finally:
        running.launcher.stop()


def test_the_worker_it_started_gets_evidence(running: Running) -> None:
    evidence = running.child_evidence()
    claims = LocalEvidenceHandler(running.ca.public_key()).verify(evidence, running.clock.now())
    assert claims.nonces == ("child-nonce", "child-binding")
    assert (claims.measurement, claims.hwmodel) == (MEASUREMENT, LOCAL_HWMODEL)
    assert running.launcher.allowed_pids == {running.child.pid}


def test_a_stranger_process_gets_a_refusal_and_no_evidence(running: Running) -> None:
    running.child_evidence()  # the worker is up and has been answered: the socket is live
    stranger = subprocess.run(
        [sys.executable, "-c", STRANGER, str(running.socket)], capture_output=True, text=True, timeout=30, check=True
    )
    assert stranger.stdout.startswith("refused: this launcher gives evidence only to the worker it started")
    assert "evidence:" not in stranger.stdout
    # The launcher's own process (here: the test) is no exception unless explicitly allowed.
    with pytest.raises(RuntimeError, match=rf"process {os.getpid()} is not it"):
        request_evidence(running.socket, ["parent-nonce", "b"])
    running.launcher.allow_pid(os.getpid())
    evidence = request_evidence(running.socket, ["parent-nonce", "b"])
    claims = LocalEvidenceHandler(running.ca.public_key()).verify(evidence, running.clock.now())
    assert claims.nonces == ("parent-nonce", "b")


def test_once_the_worker_has_exited_nobody_is_answered(running: Running) -> None:
    running.child_evidence()
    running.child.terminate()
    running.child.wait(timeout=10)
    assert running.launcher.allowed_pids == frozenset()
    stranger = subprocess.run(
        [sys.executable, "-c", STRANGER, str(running.socket)], capture_output=True, text=True, timeout=30, check=True
    )
    assert stranger.stdout.startswith("refused:")
