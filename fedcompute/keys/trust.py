"""Which key providers a device, worker or dealer trusts: provider id -> ES256 signing public key (pinned)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.core.files import replace_durably
from fedcompute.keys.statement import load_signing_public, public_der


def write_trusted(path: Path, providers: Mapping[str, ec.EllipticCurvePublicKey]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({pid: public_der(key).hex() for pid, key in sorted(providers.items())}, indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".trusted-")
    with os.fdopen(fd, "w") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    replace_durably(tmp, path)  # pinned once: a pin lost to a power cut would be trusted on first use again


def load_trusted(path: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no trusted key providers file at {path}") from None
    return {pid: load_signing_public(bytes.fromhex(der)) for pid, der in data.items()}
