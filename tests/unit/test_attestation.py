"""Evidence, the verifier's appraisal and attestation results: local launcher and Confidential Space tokens."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fedcompute.attestation.evidence import (
    CONFIDENTIAL_SPACE_FORMAT,
    CONFIDENTIAL_SPACE_ISSUER,
    LOCAL_FORMAT,
    ConfidentialSpaceHandler,
    LocalEvidenceHandler,
)
from fedcompute.attestation.launcher import Launcher
from fedcompute.attestation.results import ReleaseBinding, ResultRejected, verify_result
from fedcompute.attestation.verifier import AppraisalPolicy, Verifier
from fedcompute.core.clock import FakeClock, RandomIds
from fedcompute.core.errors import InvalidArgument, PermissionDenied

MEASUREMENT = "sha256:" + "ab" * 32
IMAGE = "sha256:" + "cd" * 32
BINDING = ReleaseBinding(b"\x01" * 32, "k_1", "task_1", 2, "agg_1", "job_1", "ef" * 32, "12" * 32)
AUDIENCE = "fedcompute-verifier"


class Fixture:
    def __init__(self, tmp_path: Path, hwmodels: set[str] | None = None, debug: bool = False) -> None:
        self.clock = FakeClock()
        ca = ec.generate_private_key(ec.SECP256R1())
        self.launcher = Launcher(tmp_path / "l.sock", ca, MEASUREMENT, self.clock, debug=debug)
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        jwks = {"keys": [{**jwk, "kid": "cs-1", "alg": "RS256", "use": "sig"}]}
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.verifier = Verifier(
            {
                LOCAL_FORMAT: LocalEvidenceHandler(ca.public_key()),
                CONFIDENTIAL_SPACE_FORMAT: ConfidentialSpaceHandler(jwks, AUDIENCE),
            },
            AppraisalPolicy(
                frozenset({MEASUREMENT, IMAGE}), frozenset(hwmodels or {"LOCAL_SOFTWARE", "GCP_INTEL_TDX"})
            ),
            self.key,
            ["kp-0", "kp-1"],
            self.clock,
            RandomIds(),
        )

    def local(self, binding: ReleaseBinding = BINDING) -> str:
        nonce, _ = self.verifier.challenge()
        return self.verifier.attest(LOCAL_FORMAT, self.launcher.evidence([nonce, binding.digest()]), BINDING)

    def cs_token(self, nonce: str, **changes: Any) -> str:
        now = int(self.clock.now().timestamp())
        claims: dict[str, Any] = {
            "iss": CONFIDENTIAL_SPACE_ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "eat_nonce": [nonce, BINDING.digest()],
            "hwmodel": "GCP_INTEL_TDX",
            "swname": "CONFIDENTIAL_SPACE",
            "dbgstat": "disabled-since-boot",
            "submods": {"container": {"image_digest": IMAGE}, "confidential_space": {"support_attributes": ["STABLE"]}},
        }
        claims.update(changes)
        return jwt.encode(claims, self.rsa, algorithm="RS256", headers={"kid": "cs-1"})


def test_local_evidence_gives_a_bound_result(tmp_path: Path) -> None:
    f = Fixture(tmp_path)
    token = f.local()
    claims = verify_result(token, f.key.public_key(), "kp-1", f.clock.now())
    assert claims["fedcompute.measurement"] == MEASUREMENT
    assert claims["fedcompute.hwmodel"] == "LOCAL_SOFTWARE"
    assert claims["fedcompute.binding"] == BINDING.digest()
    assert claims["submods"]["aggregator"]["ear.status"] == "affirming"
    with pytest.raises(ResultRejected, match=r"(?i)audience"):
        verify_result(token, f.key.public_key(), "kp-9", f.clock.now())
    f.clock.advance(timedelta(minutes=6))
    with pytest.raises(ResultRejected, match="expired"):
        verify_result(token, f.key.public_key(), "kp-1", f.clock.now())


def test_wrong_measurement_debug_and_production_policy_are_refused(tmp_path: Path) -> None:
    f = Fixture(tmp_path)
    f.launcher = Launcher(tmp_path / "x.sock", ec.generate_private_key(ec.SECP256R1()), MEASUREMENT, f.clock)
    with pytest.raises(PermissionDenied, match="does not verify"):  # evidence from an unendorsed launcher
        f.local()
    other = Fixture(tmp_path)
    other.launcher._measurement = "sha256:" + "00" * 32
    with pytest.raises(PermissionDenied, match="measurement"):
        other.local()
    with pytest.raises(PermissionDenied, match="debugging"):
        Fixture(tmp_path, debug=True).local()
    with pytest.raises(PermissionDenied, match="LOCAL_SOFTWARE"):
        Fixture(tmp_path, hwmodels={"GCP_INTEL_TDX"}).local()


def test_stale_reused_or_unbound_nonces_are_refused(tmp_path: Path) -> None:
    f = Fixture(tmp_path)
    nonce, _ = f.verifier.challenge()
    evidence = f.launcher.evidence([nonce, BINDING.digest()])
    f.verifier.attest(LOCAL_FORMAT, evidence, BINDING)
    with pytest.raises(PermissionDenied, match="already used"):
        f.verifier.attest(LOCAL_FORMAT, evidence, BINDING)
    stale, _ = f.verifier.challenge()
    f.clock.advance(timedelta(minutes=3))
    with pytest.raises(PermissionDenied, match="expired"):
        f.verifier.attest(LOCAL_FORMAT, f.launcher.evidence([stale, BINDING.digest()]), BINDING)
    other = ReleaseBinding(b"\x02" * 32, "k_1", "task_1", 2, "agg_1", "job_1", "ef" * 32, "12" * 32)
    with pytest.raises(PermissionDenied, match="another key-release request"):
        f.local(other)
    with pytest.raises(InvalidArgument, match="evidence_format"):
        f.verifier.attest("sev-snp", evidence, BINDING)


def test_confidential_space_token_is_verified_against_the_jwks(tmp_path: Path) -> None:
    f = Fixture(tmp_path)
    nonce, _ = f.verifier.challenge()
    token = f.verifier.attest(CONFIDENTIAL_SPACE_FORMAT, f.cs_token(nonce), BINDING)
    claims = verify_result(token, f.key.public_key(), "kp-0", f.clock.now())
    assert (claims["fedcompute.hwmodel"], claims["fedcompute.measurement"]) == ("GCP_INTEL_TDX", IMAGE)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"dbgstat": "enabled"}, "debugging"),
        ({"swname": "GCE"}, "swname"),
        ({"submods": {"container": {"image_digest": IMAGE}, "confidential_space": {}}}, "STABLE"),
        (
            {
                "submods": {
                    "container": {"image_digest": "sha256:11"},
                    "confidential_space": {"support_attributes": ["STABLE"]},
                }
            },
            "measurement",
        ),
        ({"aud": "someone-else"}, "does not verify"),
        ({"iss": "https://evil.example"}, "does not verify"),
        ({"exp": 1}, "expired"),
    ],
)
def test_bad_confidential_space_tokens_are_refused(tmp_path: Path, changes: dict[str, Any], problem: str) -> None:
    f = Fixture(tmp_path)
    nonce, _ = f.verifier.challenge()
    with pytest.raises(PermissionDenied, match=problem):
        f.verifier.attest(CONFIDENTIAL_SPACE_FORMAT, f.cs_token(nonce, **changes), BINDING)


def test_token_signed_by_a_key_outside_the_jwks_is_refused(tmp_path: Path) -> None:
    f = Fixture(tmp_path)
    nonce, _ = f.verifier.challenge()
    f.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(PermissionDenied, match="does not verify"):
        f.verifier.attest(CONFIDENTIAL_SPACE_FORMAT, f.cs_token(nonce), BINDING)


def test_outstanding_challenges_are_bounded_and_dropped_oldest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone may ask for a challenge. Each call rebuilt the whole table of outstanding ones under the verifier's
    lock (91 ms a call at 300,000: found by review, 2026-12-02). Expired ones now go from the front as new ones come,
    and past MAX_CHALLENGES (here 3) the oldest is dropped: it can no longer be used."""
    from fedcompute.attestation import verifier as module

    monkeypatch.setattr(module, "MAX_CHALLENGES", 3)
    f = Fixture(tmp_path)
    for _ in range(5):
        f.verifier.challenge()
    f.clock.advance(timedelta(minutes=3))
    kept, _ = f.verifier.challenge()
    assert list(f.verifier._challenges) == [kept]  # the expired ones are gone
    oldest, _ = f.verifier.challenge()
    for _ in range(3):
        f.verifier.challenge()
    assert len(f.verifier._challenges) == 3
    with pytest.raises(PermissionDenied, match="unknown"):
        f.verifier.attest(LOCAL_FORMAT, f.launcher.evidence([oldest, BINDING.digest()]), BINDING)
    newest, _ = f.verifier.challenge()
    assert f.verifier.attest(LOCAL_FORMAT, f.launcher.evidence([newest, BINDING.digest()]), BINDING)
