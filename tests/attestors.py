"""A device attestor for tests, loaded by FEDCOMPUTE_DEVICE_ATTESTATION=tests.attestors:genuine_only."""

from __future__ import annotations

from fedcompute.core.errors import PermissionDenied


class GenuineOnly:
    """Believes a device only if its evidence is exactly ``b"genuine"`` (a stand-in for a Play Integrity
    verdict: the hook's contract, not a real attestation)."""

    def check(self, population: str, evidence: bytes) -> None:
        if evidence != b"genuine":
            raise PermissionDenied("device attestation failed: the evidence is not a genuine device's")


def genuine_only() -> GenuineOnly:
    return GenuineOnly()
