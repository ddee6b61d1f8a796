"""Transport security from settings: TLS on every server, mTLS where a component requires client certificates,
and plaintext only when ``FEDCOMPUTE_PLAINTEXT`` says so."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from fedcompute.core.settings import SettingError, Settings

NO_TRANSPORT = (
    "no TLS files are configured: set FEDCOMPUTE_TLS_CERT_FILE and FEDCOMPUTE_TLS_KEY_FILE "
    "(`fedcompute certs dev` makes them), or FEDCOMPUTE_PLAINTEXT=true on a trusted network"
)
NO_CA = (
    "no CA to verify servers with: set FEDCOMPUTE_TLS_CA_FILE (`fedcompute certs dev` makes one), "
    "or FEDCOMPUTE_PLAINTEXT=true on a trusted network"
)


def _read(path: Path | None, setting: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingError(setting, f"cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ServerTls:
    """This component's certificate and key, and the CA its clients' certificates must chain to (mTLS)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def server_tls(settings: Settings) -> ServerTls | None:
    """TLS for a server of this component, or None where plaintext was asked for; neither is a setting error."""
    if settings.tls_cert_file is None:
        if not settings.plaintext:
            raise SettingError("tls_cert_file", NO_TRANSPORT)
        return None
    chain = _read(settings.tls_cert_file, "tls_cert_file")
    key = _read(settings.tls_key_file, "tls_key_file")
    assert chain is not None
    assert key is not None
    client_ca = _read(settings.tls_ca_file, "tls_ca_file") if settings.tls_client_auth else None
    return ServerTls(chain, key, client_ca)


@dataclass(frozen=True)
class ClientTls:
    """How this process calls others: the CA it verifies servers with, and its certificate for mTLS ports."""

    root_ca: bytes
    cert_chain: bytes | None
    private_key: bytes | None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_ca, self.private_key, self.cert_chain)


def client_tls(settings: Settings) -> ClientTls | None:
    """None means plaintext (only with ``FEDCOMPUTE_PLAINTEXT``); with a CA, this process's own certificate, if
    it has one, is presented to servers that ask for it."""
    if settings.tls_ca_file is None:
        if not settings.plaintext:
            raise SettingError("tls_ca_file", NO_CA)
        return None
    root = _read(settings.tls_ca_file, "tls_ca_file")
    assert root is not None
    return ClientTls(root, _read(settings.tls_cert_file, "tls_cert_file"), _read(settings.tls_key_file, "tls_key_file"))
