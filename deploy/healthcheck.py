"""Readiness probe of a fedcompute container: the gRPC health (grpc.health.v1, overall status "") of its own port.

    python /opt/fedcompute/healthcheck.py PORT      exit 0: SERVING; 1: anything else (one line says why)

Kubernetes' native gRPC probe (``grpc: {port: N}``) and Docker's health checks cannot speak TLS, and fedcompute
serves TLS everywhere (mTLS on key services and verifier). An exec probe runs with the container's environment, so
this script reads the component's own ``FEDCOMPUTE_*`` settings and asks over the same transport the component
serves: TLS when ``FEDCOMPUTE_TLS_CERT_FILE`` is set (verifying the server against ``FEDCOMPUTE_TLS_CA_FILE`` and
presenting the component's own certificate, which mTLS ports require), plaintext otherwise. It asks its own process
on the loopback address, so it checks the certificate under the first DNS name the certificate itself names.

The image installs it at /opt/fedcompute/healthcheck.py (deploy/Dockerfile); deploy/compose.yaml and deploy/k8s use it.
"""

from __future__ import annotations

import sys

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcompute.core.settings import SettingError, Settings
from fedcompute.rpc.tls import client_tls

TIMEOUT_S = 3.0
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def first_dns_name(cert_pem: bytes) -> str | None:
    """The first DNS subject alternative name of a PEM certificate (None: it names IP addresses only)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if dns else None


def own_channel(settings: Settings, port: int) -> grpc.Channel:
    """A channel to this container's ``port`` over the transport its component serves."""
    host = "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host
    target = f"{host}:{port}"
    if settings.tls_cert_file is None:  # the component serves plaintext (Settings refuses that unless asked)
        return grpc.insecure_channel(target)
    tls = client_tls(settings)
    if tls is None:
        raise SettingError("tls_ca_file", "the probe needs the CA file to verify this component's certificate")
    name = first_dns_name(settings.tls_cert_file.read_bytes())
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, tls.credentials(), options=options)


def check(port: int) -> str | None:
    """None when the component on ``port`` is SERVING; otherwise why not, in one line."""
    try:
        settings = Settings.load()
        with own_channel(settings, port) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    except SettingError as exc:
        return f"invalid setting: {exc}"
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return None
    return f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: healthcheck.py PORT", file=sys.stderr)
        return 2
    problem = check(int(args[0]))
    if problem is None:
        return 0
    print(f"not ready: {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
