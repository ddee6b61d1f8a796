"""Where a key provider's KEK comes from: a secret kept apart from the shares it seals.

Order: ``FEDCOMPUTE_KEY_ENCRYPTION_KEY`` (hex), then ``key_encryption_key_file`` (a file that must lie outside
the provider's data directory, e.g. a mounted secret or a KMS-decrypted file). With neither, the development
policy generates one into ``workdir/kek/<provider>.key`` (outside the data directory, but on the same disk:
a demo set-up, said so in the log); the production policy refuses to start.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import structlog

from fedcompute.core.settings import Settings

log = structlog.get_logger("fedcompute.keys")


class KekUnavailable(Exception):
    """No acceptable KEK: the message names the setting to fix."""


def _parse(text: str, source: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise KekUnavailable(f"{source} is not hex") from None
    if len(raw) != 32:
        raise KekUnavailable(f"{source} must hold 32 bytes (64 hex digits), got {len(raw)}")
    return raw


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def load_kek(settings: Settings) -> bytes:
    data_dir = settings.key_dir()
    if settings.key_encryption_key:
        return _parse(settings.key_encryption_key, "FEDCOMPUTE_KEY_ENCRYPTION_KEY")
    production = settings.attestation_policy == "production"
    path = settings.key_encryption_key_file
    if path is not None:
        if _inside(path, data_dir):
            message = f"key_encryption_key_file {path} lies inside the key service's data directory {data_dir}"
            if production:
                raise KekUnavailable(message + "; move it out (a KEK beside the shares protects nothing)")
            log.warning("kek_beside_shares", detail=message)
        try:
            return _parse(path.read_text(), f"key_encryption_key_file {path}")
        except OSError as exc:
            raise KekUnavailable(f"key_encryption_key_file {path} cannot be read: {exc.strerror}") from None
    if production:
        raise KekUnavailable(
            "no KEK configured: set FEDCOMPUTE_KEY_ENCRYPTION_KEY or FEDCOMPUTE_KEY_ENCRYPTION_KEY_FILE "
            "(a secret outside the data directory); the production policy never generates one"
        )
    path = settings.workdir / "kek" / f"{settings.provider_id}.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        log.warning(
            "kek_generated_for_demo",
            path=str(path),
            detail="one disk for every provider is a demo set-up: give each key service its own KEK secret",
        )
    return _parse(path.read_text(), f"generated KEK {path}")
