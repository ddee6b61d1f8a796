"""Supervision with real processes and kill -9: the launcher restarts its worker and takes it down with it,
`up` restarts a dead key service on its own address, a worker whose evidence source is gone fails at once, and a
process that holds a key service's port before it binds is never pinned as that provider."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.aggregator.keys import JobKeys, KeyAccess, KeyUnavailable
from fedcompute.attestation.launcher import Launcher, request_evidence
from fedcompute.attestation.results import ReleaseBinding
from fedcompute.clients.typed import VerifierClient
from fedcompute.core.clock import FakeClock
from fedcompute.rpc.channels import open_channel
from fedcompute.suite import wait_serving
from fedcompute.v1 import aggregation_pb2
from tests.harness import Harness, suite_settings, wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_the_launcher_restarts_its_worker_after_kill_9(tmp_path: Path) -> None:
    launcher = Launcher(
        tmp_path / "l.sock",
        ec.generate_private_key(ec.SECP256R1()),
        "sha256:" + "aa" * 32,
        FakeClock(datetime.now(UTC)),
    ).serve()
    try:
        first = launcher.start_worker(dict(os.environ), SLEEPER).pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: launcher.child is not None and launcher.child.pid != first, 20, "a restarted worker")
        assert launcher.restarts == 1
        assert launcher.child is not None
        assert launcher.child.poll() is None
    finally:
        launcher.stop()
    assert launcher.child is not None
    assert launcher.child.poll() is not None  # stopping the launcher stops its worker, and nothing restarts it


def test_a_killed_launcher_leaves_no_orphan_worker(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from datetime import UTC, datetime
        from cryptography.hazmat.primitives.asymmetric import ec
        from fedcompute.attestation.launcher import Launcher
        from fedcompute.core.clock import FakeClock
        from fedcompute.core.logs import configure_logging
        from pathlib import Path
        configure_logging(False)  # logs to stderr; stdout carries the worker's pid
        launcher = Launcher(Path({str(tmp_path / "l.sock")!r}), ec.generate_private_key(ec.SECP256R1()), "m",
                            FakeClock(datetime.now(UTC))).serve()
        child = launcher.start_worker(dict(os.environ), {SLEEPER!r})
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert not _gone(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_for(lambda: _gone(worker), 10, "the orphaned worker to die with its launcher")
    finally:
        parent.kill()


def test_up_restarts_a_dead_key_service_on_its_address(tmp_path: Path) -> None:
    settings = suite_settings(tmp_path / "w", f"sqlite:///{tmp_path / 'db.sqlite'}", key_service_processes=True)
    harness = Harness.start(settings, aggregator=False)
    try:
        victim = harness.suite.key_services[1]
        old = victim.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: victim.pid != old, 30, "the key service to be restarted")
        wait_serving(harness.suite.settings, victim.address, 60, "the restarted key service")
    finally:
        harness.stop()


def test_a_worker_whose_evidence_source_is_gone_fails_at_once(tmp_path: Path) -> None:
    harness = Harness.start(suite_settings(tmp_path / "w", f"sqlite:///{tmp_path / 'db.sqlite'}"), aggregator=False)
    try:
        access = KeyAccess(
            providers=[],
            trusted={},
            threshold=1,
            verifier=VerifierClient(open_channel(harness.suite.settings.verifier_address), 10.0),
            evidence=lambda nonces: request_evidence(tmp_path / "no-launcher.sock", nonces),
        )
        keys = JobKeys(access, aggregation_pb2.AggregationJob(job_id="job_x"), "ab" * 32, [])
        started = time.monotonic()
        with pytest.raises(KeyUnavailable, match="no evidence from the attester"):
            keys._attest(ReleaseBinding(b"\x01" * 32, "k", "t", 1, "agg", "job_x", "cd" * 32, "ab" * 32))
        assert time.monotonic() - started < 5  # not a lease's wait
    finally:
        harness.stop()


@pytest.mark.parametrize("impostor_kind", ["a key service claiming kp-0", "any healthy gRPC server"])
def test_a_process_holding_a_key_service_port_first_is_never_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impostor_kind: str
) -> None:
    """Another process on the machine (a key service of its own that claims the same provider id, or any server
    answering health checks) binds the port the suite chose for its key service before the service's process
    does. The suite's service cannot bind and the impostor answers its health checks, so trust on first use
    would pin the impostor. The suite refuses to start instead, naming the port, stops the key-service process
    it started, and writes no trusted-providers file."""
    from fedcompute import suite as suite_module
    from fedcompute.core.clock import SystemClock
    from fedcompute.keys.app import build_key_server
    from fedcompute.rpc.serving import build_health_server
    from fedcompute.suite import StartupFailed, start_suite

    if impostor_kind.startswith("a key service"):
        impostor = build_key_server(suite_settings(tmp_path / "impostor", "", provider_id="kp-0"), SystemClock(), "t")
    else:
        server = build_health_server(suite_settings(tmp_path / "impostor", "", health_port=_free_tcp_port()), "x", {},
                                     None)  # fmt: skip
        assert server is not None
        impostor = server
    taken = iter([impostor.port])
    real_free_port = suite_module.free_port
    monkeypatch.setattr(suite_module, "free_port", lambda host: next(taken, None) or real_free_port(host))
    settings = suite_settings(tmp_path / "w", "", key_services=1, threshold=1, key_service_processes=True)
    spawned: list[Any] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> Any:
        spawned.append(real_popen(*args, **kwargs))
        return spawned[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    try:
        with pytest.raises(StartupFailed, match=f"key service kp-0 was started for 127.0.0.1:{impostor.port}, but "
                                                 "another process answers there"):  # fmt: skip
            start_suite(settings, aggregator=False)
    finally:
        impostor.stop(grace=0)
    assert not settings.trusted_providers_path().exists()
    assert spawned
    assert all(p.poll() is not None for p in spawned)  # the key-service process it started was stopped


def _free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
