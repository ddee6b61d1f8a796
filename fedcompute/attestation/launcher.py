"""The local attester: measures the aggregator before starting it and answers its evidence requests.

The launcher holds the attestation key (AK, ES256) and its endorsement from the local platform CA; the worker
it starts never sees either. The worker asks for evidence over a UNIX socket with one JSON line
``{"nonces": [...]}`` and gets ``{"evidence": "<JWT>"}`` back (like Confidential Space's teeserver socket).
The socket is 0600, and the launcher answers only the process it started (the peer's pid from SO_PEERCRED):
another process of the same account gets ``{"error": ...}``.

What this does NOT protect against: anyone with root on the host (or the launcher's account) can read the AK
and forge evidence, and can read the worker's memory. That is why the evidence says
``hwmodel = LOCAL_SOFTWARE`` and why production policies must refuse it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute import __version__
from fedcompute.attestation.evidence import LOCAL_HWMODEL
from fedcompute.core.clock import Clock
from fedcompute.core.processes import RestartBackoff, die_with_parent

log = structlog.get_logger("fedcompute.launcher")
EVIDENCE_LIFETIME = timedelta(minutes=5)
WORKER_COMMAND = (sys.executable, "-I", "-B", "-m", "fedcompute.aggregator.main")
PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid (SO_PEERCRED, Linux)
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_CHARS = 64 * 1024


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
        self._extra_pids: set[int] = set()
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._command: list[str] = list(WORKER_COMMAND)
        self._env: dict[str, str] = {}
        self._supervisor: threading.Thread | None = None

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

    @property
    def allowed_pids(self) -> frozenset[int]:
        """Who gets evidence: the running worker this launcher started, plus pids allowed with ``allow_pid``."""
        pids = set(self._extra_pids)
        # While the child runs (unreaped) its pid cannot be reused by another process.
        if self.child is not None and self.child.poll() is None:
            pids.add(self.child.pid)
        return frozenset(pids)

    def allow_pid(self, pid: int) -> None:
        """Also answer ``pid`` (e.g. a test calling ``request_evidence`` itself). By default only the child is."""
        self._extra_pids.add(pid)

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
                try:
                    self._answer(conn)
                except OSError as exc:  # a client that hangs up or stalls must not stop the launcher
                    log.warning("evidence_request_failed", error=str(exc))

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT_S)
        pid, uid, _ = PEER_CREDENTIALS.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size)
        )
        line = conn.makefile("r").readline(MAX_REQUEST_CHARS)  # read first: replying to unread data may reset
        reply: dict[str, str]
        if pid not in self.allowed_pids:
            log.warning("evidence_request_refused", peer_pid=pid, peer_uid=uid, worker_pid=self._child_pid())
            reply = {"error": f"this launcher gives evidence only to the worker it started; process {pid} is not it"}
        else:
            try:
                request = json.loads(line)
                nonces = [str(n) for n in request["nonces"]]
                reply = {"evidence": self.evidence(nonces)}
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"error": f"bad evidence request: {exc}"}
        conn.sendall((json.dumps(reply) + "\n").encode())

    def _child_pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def start_worker(self, env: dict[str, str], command: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
        """Start the measured worker isolated (-I: no PYTHON* variables, no user site; -B: no bytecode writes).

        ``command`` replaces the worker's command line (tests start a small stand-in); only this process is
        answered on the socket.
        """
        self._command = list(command or WORKER_COMMAND)
        self._env = {**env, "FEDCOMPUTE_ATTESTER_SOCKET": str(self._socket_path)}
        child = self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="launcher-supervisor", daemon=True)
        self._supervisor.start()
        return child

    def _spawn(self) -> subprocess.Popen[bytes]:
        # The worker dies with the launcher (SIGTERM on parent death): no orphan keeps taking jobs.
        self.child = subprocess.Popen(die_with_parent(self._command), env=self._env)
        log.info("worker_started", pid=self.child.pid, measurement=self._measurement, restarts=self.restarts)
        return self.child

    def _supervise(self) -> None:
        """Restart the worker whenever it exits (with backoff), until the launcher stops."""
        backoff = RestartBackoff()
        started = time.monotonic()
        while not self._stop.is_set():
            child = self.child
            if child is None or child.poll() is None:
                self._stop.wait(0.2)
                continue
            delay = backoff.next_delay(time.monotonic() - started)
            log.warning("worker_exited", pid=child.pid, code=child.returncode, restart_in_s=delay)
            if self._stop.wait(delay):
                return
            self.restarts += 1
            self._spawn()
            started = time.monotonic()

    def stop(self) -> None:
        self._stop.set()  # first: the supervisor must not restart the worker we are stopping
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
