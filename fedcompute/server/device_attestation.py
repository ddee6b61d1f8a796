"""The device-attestation hook at check-in.

A ``DeviceAttestor`` sees the evidence a device sends with ``CreateTaskAssignment`` (``device_attestation``: a
Play Integrity token, an Android key attestation chain…) and refuses a device it does not believe by raising
``PermissionDenied``; it runs before any database work. The default accepts every device. Operators plug one in
with ``FEDCOMPUTE_DEVICE_ATTESTATION=MODULE:FACTORY``, where ``FACTORY()`` returns the attestor.

What it protects: the server's own resources and the round's composition against emulators and scripted
clients (Sybils); it protects nothing the key services enforce, which never trust the server's word.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from fedcompute.core.settings import SettingError


class DeviceAttestor(Protocol):
    def check(self, population: str, evidence: bytes) -> None:
        """Return if the device is believed; raise ``PermissionDenied`` (or ``Unauthenticated``) if not."""
        ...


class AcceptEveryDevice:
    """The default: no device attestation (simulated fleets, emulators, a first deployment)."""

    def check(self, population: str, evidence: bytes) -> None:
        return None


def load_attestor(spec: str) -> DeviceAttestor:
    """``MODULE:FACTORY`` → ``FACTORY()``; empty → accept every device. A bad spec names the setting."""
    if not spec:
        return AcceptEveryDevice()
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise SettingError("device_attestation", f"expected MODULE:FACTORY, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise SettingError("device_attestation", f"cannot load {spec!r}: {exc}") from None
    attestor = factory()
    if not callable(getattr(attestor, "check", None)):
        raise SettingError("device_attestation", f"{spec!r} did not return an object with a check() method")
    return attestor  # type: ignore[no-any-return]
