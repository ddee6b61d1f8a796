"""Bearer-token checks for internal callers, and HMAC tokens bound to one assignment or upload."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import grpc

from fedcompute.core.errors import PermissionDenied, Unauthenticated

AUTHORIZATION = "authorization"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {token}"),)


def bearer_token(context: grpc.ServicerContext) -> str | None:
    """The token of the call's ``authorization: Bearer <token>`` header; None without one (or another scheme)."""
    metadata: Sequence[tuple[str, str | bytes]] = context.invocation_metadata() or ()
    values = [v for k, v in metadata if k == AUTHORIZATION]
    if not values:
        return None
    text = values[0].decode() if isinstance(values[0], bytes) else values[0]
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def require_bearer(context: grpc.ServicerContext, expected: str) -> None:
    """Raise ``Unauthenticated``/``PermissionDenied`` unless the call carries ``Bearer <expected>``."""
    metadata: Sequence[tuple[str, str | bytes]] = context.invocation_metadata() or ()
    values = [v for k, v in metadata if k == AUTHORIZATION]
    if not values:
        raise Unauthenticated("this internal RPC needs an 'authorization: Bearer <token>' header")
    presented = values[0]
    presented_text = presented.decode() if isinstance(presented, bytes) else presented
    if not hmac.compare_digest(presented_text, f"Bearer {expected}"):
        raise PermissionDenied("the internal token is not valid for this service")


class TokenSigner:
    """Derives unforgeable tokens from a server secret: HMAC-SHA256 over a purpose and its subject.

    The key is set up once; each token copies that keyed state and hashes its message (short: no GIL release).
    ``hmac.digest`` set the key up again for every token and released the GIL around its one-shot call, under
    load a likely thread switch in every check-in, report and upload (see ``core.clock.RandomIds``)."""

    def __init__(self, secret: bytes) -> None:
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)

    def token(self, purpose: str, subject: str) -> str:
        mac = self._keyed.copy()
        mac.update(f"{purpose}\x00{subject}".encode())
        return mac.hexdigest()

    def verify(self, purpose: str, subject: str, presented: str) -> bool:
        return hmac.compare_digest(self.token(purpose, subject), presented)
