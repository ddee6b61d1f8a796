"""The local attester: measures the aggregator before starting it and answers its evidence requests.

The launcher holds the attestation key (AK, ES256) and its endorsement from the local platform CA; the worker
it starts never sees either. The worker asks for evidence over a UNIX socket with one JSON line
``{"nonces": [...]}`` and gets ``{"evidence": "<JWT>"}`` back (like Confidential Space's teeserver socket).

What this does NOT protect against: anyone with root on the host (or the launcher's account) can read the AK
and forge evidence, and can read the worker's memory. That is why the evidence says
``hwmodel = LOCAL_SOFTWARE`` and why production policies must refuse it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute import __version__
from fedcompute.attestation.evidence import LOCAL_HWMODEL
from fedcompute.core.clock import Clock

log = structlog.get_logger("fedcompute.launcher")
EVIDENCE_LIFETIME = timedelta(minutes=5)


def endorse(
    platform_ca: ec.EllipticCurvePrivateKey, ak: ec.EllipticCurvePrivateKey, launcher_id: str, clock: Clock
) -> str:
    """The platform CA vouches for a launcher's attestation key (stands in for a hardware vendor's chain)."""
    now = clock.now()
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ak.public_key()))
    claims = {
        "sub": launcher_id,
        "ak": jwk,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(days=1)).timestamp()),
    }
    return jwt.encode(claims, platform_ca, algorithm="ES256")


class Launcher:
    def __init__(
        self,
        socket_path: Path,
        platform_ca: ec.EllipticCurvePrivateKey,
        measurement: str,
        clock: Clock,
        launcher_id: str = "local",
        debug: bool = False,
    ) -> None:
        self._socket_path = socket_path
        self._ak = ec.generate_private_key(ec.SECP256R1())
        self._endorsement = endorse(platform_ca, self._ak, launcher_id, clock)
        self._measurement = measurement
        self._clock = clock
        self._launcher_id = launcher_id
        self._debug = debug
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.child: subprocess.Popen[bytes] | None = None

    def evidence(self, nonces: list[str]) -> str:
        now = self._clock.now()
        claims = {
            "iss": f"fedcompute-launcher/{self._launcher_id}",
            "iat": int(now.timestamp()),
            "exp": int((now + EVIDENCE_LIFETIME).timestamp()),
            "eat_profile": "urn:fedcompute:eat:local:v1",
            "eat_nonce": nonces,
            "hwmodel": LOCAL_HWMODEL,
            "swname": "fedcompute-aggregator",
            "swversion": [__version__],
            "dbgstat": "enabled" if self._debug else "disabled-since-boot",
            "submods": {"container": {"image_digest": self._measurement}},
        }
        return jwt.encode(claims, self._ak, algorithm="ES256", headers={"x-endorsement": self._endorsement})

    def serve(self) -> Launcher:
        self._socket_path.parent.mkdir(parents=True, exist_ok=True)
        self._socket_path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self._socket_path))
        os.chmod(self._socket_path, 0o600)
        server.listen(8)
        server.settimeout(0.2)
        self._server = server
        self._thread = threading.Thread(target=self._accept, name="launcher", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        try:
            request = json.loads(conn.makefile("r").readline())
            nonces = [str(n) for n in request["nonces"]]
            reply = {"evidence": self.evidence(nonces)}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"error": f"bad evidence request: {exc}"}
        conn.sendall((json.dumps(reply) + "\n").encode())

    def start_worker(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start the measured worker isolated (-I: no PYTHON* variables, no user site; -B: no bytecode writes)."""
        self.child = subprocess.Popen(
            [sys.executable, "-I", "-B", "-m", "fedcompute.aggregator.main"],
            env={**env, "FEDCOMPUTE_ATTESTER_SOCKET": str(self._socket_path)},
        )
        log.info("worker_started", pid=self.child.pid, measurement=self._measurement)
        return self.child

    def stop(self) -> None:
        if self.child and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.child.kill()
        self._stop.set()
        if self._server:
            self._server.close()
        self._socket_path.unlink(missing_ok=True)


def request_evidence(socket_path: Path, nonces: list[str], timeout_s: float = 10.0) -> str:
    """Worker side: ask the launcher for evidence carrying ``nonces``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        conn.connect(str(socket_path))
        conn.sendall((json.dumps({"nonces": nonces}) + "\n").encode())
        reply = json.loads(conn.makefile("r").readline())
    if "evidence" not in reply:
        raise RuntimeError(reply.get("error", "the launcher gave no evidence"))
    return str(reply["evidence"])
