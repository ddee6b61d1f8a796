"""The one settings object, parsed once in ``main()`` and passed down (environment prefix ``FEDCOMPUTE_``)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "FEDCOMPUTE_"
RESERVED_PREFIX = "FEDCOMPUTE_TEST_"  # the test suite's own variables, never read by a component
_DATABASE_URL = re.compile(r"^(sqlite|postgresql)(\+[a-z0-9_]+)?://[^\s]*$")
_S3_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$")


class SettingError(Exception):
    """A setting that cannot work (a busy port, a missing file, a malformed value): one line naming it."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        super().__init__(f"{variable(setting)}: {problem}")


def variable(setting: str) -> str:
    """The environment variable of a settings field."""
    return f"{PREFIX}{setting.upper()}"


SECRET_SETTINGS = frozenset(
    {
        "internal_token",
        "token_secret",
        "key_admin_token",
        "key_encryption_key",
        "operator_token",
        "s3_access_key_id",
        "s3_secret_access_key",
    }
)


class Settings(BaseSettings):
    """Every knob of every component. Each field is documented; bad values fail at start naming the setting."""

    model_config = SettingsConfigDict(env_prefix="FEDCOMPUTE_", extra="forbid")

    workdir: Path = Field(
        Path("./fedcompute-data"),
        description="Root directory; each component keeps its data in its own subdirectory (server/, keys/ID/, "
        "verifier/, attest/, operator/; public/ holds public keys only).",
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL; empty means a SQLite file in workdir. "
        "Postgres: postgresql+psycopg://user@host:5432/db",
    )
    host: str = Field("127.0.0.1", description="Address the gRPC servers bind to.")
    server_port: int = Field(8700, ge=0, le=65535, description="Port of the orchestration server (0: any free).")
    key_service_port: int = Field(8710, ge=0, le=65535, description="Port of the key service (0: any free).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics HTTP port (0: disabled).")
    server_address: str = Field("127.0.0.1:8700", description="Where clients and workers reach the server.")
    key_service_addresses: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:8710"], description="Where the server and workers reach key services."
    )
    internal_token: str = Field(
        "", description="Bearer token aggregator workers present to the server; empty: generated into server/."
    )
    key_admin_token: str = Field(
        "",
        description="Bearer token of the operator (dealer, task creation) for key-service administration: "
        "ImportKeyShare, ActivateKey, RegisterPolicy. Never give it to the orchestration server. "
        "Empty: generated into operator/.",
    )
    key_encryption_key: str = Field(
        "", description="This key service's KEK (64 hex digits) sealing its shares at rest; or use the file setting."
    )
    key_encryption_key_file: Path | None = Field(
        None, description="File holding this key service's KEK (64 hex digits); must lie outside its data directory."
    )
    upload_retention_s: float = Field(
        0.0, ge=0, description="How long encrypted uploads are kept after their round was released or abandoned."
    )
    token_secret: str = Field(
        "", description="HMAC secret for session and upload tokens; empty: generated into workdir."
    )
    provider_id: str = Field("kp-0", description="This key service's provider id (`serve keys`).")
    key_services: int = Field(3, ge=1, le=16, description="Key services `up`/`demo` start (one share each).")
    threshold: int = Field(2, ge=1, le=16, description="Shares needed to rebuild a population key (t of n).")
    key_service_processes: bool = Field(
        True, description="`up`/`demo`: run each key service as its own process (False: threads, for tests)."
    )
    trusted_providers_file: Path | None = Field(
        None, description="JSON {provider_id: signing key DER hex} devices/workers trust; default workdir/."
    )
    verifier_port: int = Field(8720, ge=0, le=65535, description="Port of the attestation verifier (0: any free).")
    verifier_address: str = Field("127.0.0.1:8720", description="Where workers reach the verifier.")
    attestation_policy: Literal["development", "production"] = Field(
        "development", description="production refuses LOCAL_SOFTWARE evidence (no hardware TEE)."
    )
    allowed_measurements: list[str] = Field(
        default_factory=list, description="Allowed aggregator code measurements; empty: measure this install."
    )
    confidential_space_jwks_file: Path | None = Field(
        None, description="JWKS (JSON) for Confidential Space tokens; enables that evidence format."
    )
    confidential_space_audience: str = Field(
        "fedcompute-verifier", description="Audience Confidential Space tokens must carry."
    )
    attester_socket: Path | None = Field(None, description="The launcher's evidence socket (set for the worker).")
    aggregator_debug: bool = Field(False, description="Start the worker in debug mode (its evidence says so).")
    aggregator_device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$", description="Where the aggregator accumulates: cpu, cuda or cuda:N."
    )
    aggregator_blob_dir: Path | None = Field(
        None,
        description="The server's local blob directory, where the worker shares its disk (`up` sets it): the worker "
        "reads contributions there, hash-checked as streamed ones; unset: streamed by the server.",
    )
    key_lifetime_s: int = Field(30 * 86400, gt=0, description="How long a population key is used for encrypting.")
    key_destroy_after_s: int = Field(7 * 86400, ge=0, description="After expiry, when key shares are destroyed.")
    key_rotate_before_s: int = Field(86400, gt=0, description="Publish the next key this long before expiry.")
    public_key_max_age_s: int = Field(300, gt=0, description="Cache lifetime of published public keys.")
    max_upload_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Largest encrypted update accepted.")
    stream_idle_s: float = Field(
        60.0,
        gt=0,
        description="An upload whose device sends nothing for this long (its first message included), or a download "
        "whose device reads nothing for this long, is cancelled, freeing the gRPC thread it holds; an upload resumes "
        "from its committed size.",
    )
    max_plan_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest plan CreateTask accepts.")
    chunk_size_bytes: int = Field(1024 * 1024, gt=0, le=3 * 1024 * 1024, description="Upload/download chunk size.")
    max_message_bytes: int = Field(128 * 1024 * 1024, gt=0, description="Largest gRPC message (job results).")
    retry_delay_min_s: float = Field(60.0, ge=0, description="Pace steering: shortest suggested retry delay.")
    retry_delay_max_s: float = Field(300.0, ge=0, description="Pace steering: longest suggested retry delay.")
    lease_s: float = Field(60.0, gt=0, description="Aggregation job lease duration.")
    max_job_attempts: int = Field(50, gt=0, description="Retryable attempts before an aggregation job fails.")
    max_round_attempts: int = Field(3, gt=0, description="Attempts at one round before its task fails.")
    job_backoff_max_s: float = Field(30.0, gt=0, description="Longest wait before a failed job is retried.")
    poll_interval_s: float = Field(1.0, gt=0, description="How often background loops look for work.")
    housekeeping_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often time-driven upkeep runs: round and client deadline sweeps, upload purges, health "
        "re-checks, the dealer's re-check of known populations' keys (deadlines are whole seconds). Apart from "
        "POLL_INTERVAL_S, so lowering that for round latency does not multiply the upkeep.",
    )
    staging_sweep_s: float = Field(
        300.0, gt=0, description="How often each server removes staged bytes of uploads that will never finish."
    )
    startup_timeout_s: float = Field(
        60.0, gt=0, description="`up`/`demo`: how long a component may take to start serving before giving up."
    )
    rpc_timeout_s: float = Field(30.0, gt=0, description="Deadline of client calls.")
    worker_threads: int = Field(24, gt=0, description="gRPC server thread pool size.")
    device_streams_max: int = Field(
        0,
        ge=0,
        description="Most device streams (uploads and downloads) one server process serves at once; more are "
        "refused RESOURCE_EXHAUSTED with a retry pushback, so that streams never hold the threads unary calls need. "
        "0: WORKER_THREADS less a quarter of them (at least 2 kept).",
    )
    reuse_port: bool = Field(
        False, description="Bind the server port with SO_REUSEPORT, so several server processes share it."
    )
    server_replicas: int = Field(1, ge=1, le=16, description="`up`: server processes sharing the server port.")
    aggregator_workers: int = Field(1, ge=1, le=16, description="`up`: attested aggregator workers (launchers).")
    log_json: bool = Field(True, description="JSON log lines (services) instead of console output.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Lowest level logged.")
    health_port: int = Field(
        8730,
        ge=0,
        le=65535,
        description="gRPC health port of the components that serve no other RPCs (dealer, model updater, "
        "aggregator worker); 0: none.",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM: health goes NOT_SERVING, then in-flight RPCs get this long to finish."
    )
    plaintext: bool = Field(
        False,
        description="Serve and call gRPC without TLS. Refused unless set: give the TLS files instead in production "
        "(`fedcompute certs dev` makes a local CA and certificates).",
    )
    tls_cert_file: Path | None = Field(None, description="This component's TLS certificate chain (PEM).")
    tls_key_file: Path | None = Field(None, description="This component's TLS private key (PEM).")
    tls_ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) this component verifies peers with: the servers it calls, client certificates.",
    )
    tls_client_auth: bool = Field(
        False,
        description="Require client certificates signed by FEDCOMPUTE_TLS_CA_FILE on this component's gRPC port "
        "(mTLS; for internal-only components: key services, verifier).",
    )
    operator_token: str = Field(
        "",
        description="Bearer token the CLI and the dealer present to TaskManagementService (`fedcompute token create`).",
    )
    device_rate_per_s: float = Field(
        100.0, ge=0, description="Device RPCs allowed per second per client address (0: no limit)."
    )
    device_rate_burst: int = Field(200, ge=1, description="Device RPCs one address may make at once before limiting.")
    device_attestation: str = Field(
        "",
        description="Device attestation at check-in: empty accepts every device; MODULE:FACTORY loads a "
        "DeviceAttestor (e.g. Android key attestation or Play Integrity).",
    )
    blob_store_url: str = Field(
        "", description="Where blobs live: empty is a directory in workdir; s3://BUCKET/PREFIX an S3-compatible store."
    )
    s3_endpoint_url: str = Field("", description="Endpoint of an S3-compatible store (empty: AWS).")
    s3_region: str = Field("us-east-1", description="Region of the S3 store.")
    s3_access_key_id: str = Field("", description="S3 access key id (empty: boto3's default credential chain).")
    s3_secret_access_key: str = Field("", description="S3 secret key (empty: boto3's default credential chain).")

    @field_validator("retry_delay_max_s")
    @classmethod
    def _window_ordered(cls, value: float, info: object) -> float:
        data = getattr(info, "data", {})
        low = data.get("retry_delay_min_s", 0.0)
        if value < low:
            raise ValueError(f"must be >= retry_delay_min_s ({low})")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: str) -> str:
        if value and not _DATABASE_URL.match(value):
            raise ValueError("not a database URL: expected sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB")
        return value

    @field_validator("blob_store_url")
    @classmethod
    def _blob_url_parses(cls, value: str) -> str:
        if value and not _S3_URL.match(value):
            raise ValueError("expected empty (a directory in workdir) or s3://BUCKET/PREFIX")
        return value

    @field_validator("tls_cert_file", "tls_key_file", "tls_ca_file")
    @classmethod
    def _tls_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold_fits(cls, value: int, info: object) -> int:
        data = getattr(info, "data", {})
        count = data.get("key_services", value)
        if value > count:
            raise ValueError(f"must be <= key_services ({count})")
        return value

    @field_validator("device_streams_max")
    @classmethod
    def _streams_leave_threads(cls, value: int, info: object) -> int:
        threads = getattr(info, "data", {}).get("worker_threads", value + 1)
        if value and value >= threads:
            raise ValueError(f"must be < worker_threads ({threads}): unary calls need threads streams cannot take")
        return value

    @field_validator("key_rotate_before_s")
    @classmethod
    def _rotation_inside_lifetime(cls, value: int, info: object) -> int:
        data = getattr(info, "data", {})
        lifetime = data.get("key_lifetime_s", value + 1)
        if value >= lifetime:
            raise ValueError(f"must be < key_lifetime_s ({lifetime}), or every poll would mint a new key")
        return value

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the environment and ``overrides``; an unknown ``FEDCOMPUTE_`` variable (a misspelling
        would otherwise be ignored) or a bad value raises ``SettingError`` naming the variable."""
        env = os.environ if environ is None else environ
        known = {variable(name) for name in cls.model_fields}
        unknown = sorted(
            k for k in env if k.startswith(PREFIX) and k not in known and not k.startswith(RESERVED_PREFIX)
        )
        if unknown:
            raise SettingError(
                unknown[0].removeprefix(PREFIX).lower(), "no such setting (see `fedcompute config list`)"
            )
        try:
            settings = cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "settings"
            raise SettingError(name, str(first["msg"]).removeprefix("Value error, ")) from None
        return settings.checked()

    def checked(self) -> Settings:
        """Checks across fields that single validators cannot make."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SettingError("tls_key_file", "give both FEDCOMPUTE_TLS_CERT_FILE and FEDCOMPUTE_TLS_KEY_FILE")
        if self.tls_client_auth and (self.tls_ca_file is None or self.tls_cert_file is None):
            raise SettingError("tls_ca_file", "client authentication needs the CA file and this component's cert")
        return self

    def public(self) -> dict[str, Any]:
        """These settings without any secret, for the start-up log line and `config check`."""
        return {
            k: ("<set>" if v else "") if k in SECRET_SETTINGS else (str(v) if isinstance(v, Path) else v)
            for k, v in self.model_dump().items()
        }

    def to_env(self) -> dict[str, str]:
        """These settings as FEDCOMPUTE_* variables, for a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            key = f"FEDCOMPUTE_{name.upper()}"
            if isinstance(value, list | dict):
                env[key] = json.dumps(value, default=str)
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            else:
                env[key] = str(value)
        return env

    def trusted_providers_path(self) -> Path:
        return self.trusted_providers_file or self.public_dir() / "trusted-providers.json"

    def resolved_device_streams_max(self) -> int:
        """``device_streams_max``, or (0) the worker threads less a quarter of them, at least 2 kept for unary calls
        (24 threads: 18 streams)."""
        return self.device_streams_max or max(1, self.worker_threads - max(2, self.worker_threads // 4))

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.server_dir() / 'fedcompute.sqlite'}"

    def server_dir(self) -> Path:
        """The orchestration server's own data: SQLite file, blobs, upload staging, its secrets."""
        return self.workdir / "server"

    def blob_dir(self) -> Path:
        """The server's local blob store (and, with an S3 store, its uploads' staging: ``tmp`` in it)."""
        return self.server_dir() / "blobs"

    def key_dir(self) -> Path:
        """This key service's data: identity, sealed shares, ledger, release log (never its KEK)."""
        return self.workdir / "keys" / self.provider_id

    def operator_dir(self) -> Path:
        """The operator's credentials (key-admin token)."""
        return self.workdir / "operator"

    def public_dir(self) -> Path:
        """Public material every component may read: pinned provider keys, verifier and platform CA public keys."""
        return self.workdir / "public"
