"""Local attestation hardening: forged hardware claims, production refusing local evidence, where keys live."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path
from typing import Literal

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.attestation.app import (
    build_verifier,
    ensure_platform_ca,
    platform_ca,
    platform_ca_key_path,
    platform_ca_public_path,
    verifier_key,
)
from fedcompute.attestation.evidence import LOCAL_FORMAT, LOCAL_HWMODEL, LocalEvidenceHandler
from fedcompute.attestation.launcher import Launcher, endorse
from fedcompute.attestation.policy import HARDWARE_TEES, allowed_hwmodels, read_public_key, verifier_public_key_path
from fedcompute.attestation.results import ReleaseBinding, verify_result
from fedcompute.attestation.verifier import AppraisalPolicy, Verifier
from fedcompute.core.clock import FakeClock, RandomIds
from fedcompute.core.errors import InvalidArgument, PermissionDenied
from fedcompute.core.settings import Settings

MEASUREMENT = "sha256:" + "ab" * 32
BINDING = ReleaseBinding(b"\x01" * 32, "k_1", "task_1", 2, "agg_1", "job_1", "ef" * 32, "12" * 32)
AUDIENCE = ["kp-0", "kp-1"]


def _settings(workdir: Path, policy: Literal["development", "production"]) -> Settings:
    return Settings(workdir=workdir, attestation_policy=policy, allowed_measurements=[MEASUREMENT])


def _forged_tdx_evidence(ca: ec.EllipticCurvePrivateKey, clock: FakeClock, nonces: list[str]) -> str:
    """Evidence from a properly endorsed attestation key that claims to run on Intel TDX."""
    ak = ec.generate_private_key(ec.SECP256R1())
    now = int(clock.now().timestamp())
    claims = {
        "iat": now,
        "exp": now + 300,
        "eat_nonce": nonces,
        "hwmodel": "GCP_INTEL_TDX",
        "swname": "fedcompute-aggregator",
        "dbgstat": "disabled-since-boot",
        "submods": {"container": {"image_digest": MEASUREMENT}},
    }
    headers = {"x-endorsement": endorse(ca, ak, "local", clock)}
    return jwt.encode(claims, ak, algorithm="ES256", headers=headers)


def _verifier(
    ca: ec.EllipticCurvePrivateKey, hwmodels: frozenset[str], clock: FakeClock, key: ec.EllipticCurvePrivateKey
) -> Verifier:
    handlers = {LOCAL_FORMAT: LocalEvidenceHandler(ca.public_key())}
    policy = AppraisalPolicy(frozenset({MEASUREMENT}), hwmodels)
    return Verifier(handlers, policy, key, AUDIENCE, clock, RandomIds())


def _attest(verifier: Verifier, evidence_for: Launcher | ec.EllipticCurvePrivateKey, clock: FakeClock) -> str:
    nonce, _ = verifier.challenge()
    nonces = [nonce, BINDING.digest()]
    if isinstance(evidence_for, Launcher):
        return verifier.attest(LOCAL_FORMAT, evidence_for.evidence(nonces), BINDING)
    return verifier.attest(LOCAL_FORMAT, _forged_tdx_evidence(evidence_for, clock, nonces), BINDING)


def test_local_evidence_claiming_a_hardware_tee_counts_as_local_software(tmp_path: Path) -> None:
    clock = FakeClock()
    ca = ec.generate_private_key(ec.SECP256R1())
    claims = LocalEvidenceHandler(ca.public_key()).verify(_forged_tdx_evidence(ca, clock, ["n", "b"]), clock.now())
    assert claims.hwmodel == LOCAL_HWMODEL
    assert (claims.nonces, claims.measurement, claims.dbgstat, claims.swname) == (
        ("n", "b"),
        MEASUREMENT,
        "disabled-since-boot",
        "fedcompute-aggregator",
    )
    # The evidence is otherwise sound: a development policy affirms it, but as LOCAL_SOFTWARE.
    key = ec.generate_private_key(ec.SECP256R1())
    token = _attest(_verifier(ca, HARDWARE_TEES | {LOCAL_HWMODEL}, clock, key), ca, clock)
    assert verify_result(token, key.public_key(), "kp-0", clock.now())["fedcompute.hwmodel"] == LOCAL_HWMODEL
    for hwmodels in (HARDWARE_TEES, allowed_hwmodels(_settings(tmp_path, "production"))):
        with pytest.raises(PermissionDenied, match="'LOCAL_SOFTWARE' is not allowed"):
            _attest(_verifier(ca, hwmodels, clock, key), ca, clock)
    production = build_verifier(_settings(tmp_path, "production"), clock, RandomIds(), AUDIENCE)
    with pytest.raises(PermissionDenied, match="not accepted under the production policy"):
        _attest(production, ca, clock)


def test_production_verifier_refuses_the_local_format_with_a_clear_message(tmp_path: Path) -> None:
    clock = FakeClock()
    settings = _settings(tmp_path, "production")
    verifier = build_verifier(settings, clock, RandomIds(), AUDIENCE)  # needs no platform CA at all
    assert not platform_ca_public_path(settings).exists()
    assert not platform_ca_key_path(settings).parent.exists()
    launcher = Launcher(tmp_path / "l.sock", ec.generate_private_key(ec.SECP256R1()), MEASUREMENT, clock)
    with pytest.raises(PermissionDenied) as refused:
        _attest(verifier, launcher, clock)
    message = refused.value.public_message
    assert "evidence format fedcompute.local-eat.v1 is not accepted under the production policy" in message
    assert "software launcher, not a hardware TEE" in message
    assert "Confidential Space" in message
    assert "attestation_policy=development" in message
    with pytest.raises(InvalidArgument, match="'sev-snp' is not supported; this verifier takes: none"):
        verifier.attest("sev-snp", "x", BINDING)


def test_the_verifier_reads_only_the_platform_cas_public_key(tmp_path: Path) -> None:
    clock = FakeClock()
    launcher_host, verifier_host = _settings(tmp_path / "a", "development"), _settings(tmp_path / "b", "development")
    with pytest.raises(FileNotFoundError, match="start the aggregator launcher on this workdir first"):
        build_verifier(verifier_host, clock, RandomIds(), AUDIENCE)

    ca = platform_ca(launcher_host)
    key_path = platform_ca_key_path(launcher_host)
    assert key_path == launcher_host.workdir / "attest" / "platform-ca.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert platform_ca_public_path(launcher_host) == launcher_host.workdir / "public" / "platform-ca-public.pem"
    assert read_public_key(platform_ca_public_path(launcher_host)).public_numbers() == ca.public_key().public_numbers()
    assert ensure_platform_ca(launcher_host).private_numbers() == ca.private_numbers()  # loaded, not replaced

    platform_ca_public_path(verifier_host).parent.mkdir(parents=True)
    shutil.copy(platform_ca_public_path(launcher_host), platform_ca_public_path(verifier_host))
    verifier = build_verifier(verifier_host, clock, RandomIds(), AUDIENCE)
    assert not (verifier_host.workdir / "attest").exists()
    assert not (verifier_host.workdir / "secrets").exists()
    token = _attest(verifier, Launcher(tmp_path / "l.sock", ca, MEASUREMENT, clock), clock)

    signing = verifier_key(verifier_host)
    assert (verifier_host.workdir / "verifier" / "verifier.pem").exists()
    assert verifier_public_key_path(verifier_host) == verifier_host.workdir / "public" / "verifier-public.pem"
    published = read_public_key(verifier_public_key_path(verifier_host))
    assert published.public_numbers() == signing.public_key().public_numbers()
    claims = verify_result(token, published, "kp-1", clock.now())
    assert claims["fedcompute.hwmodel"] == LOCAL_HWMODEL
