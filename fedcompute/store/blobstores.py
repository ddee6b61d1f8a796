"""Choosing the blob store from settings: a directory in workdir (the default) or an S3-compatible bucket.

``FEDCOMPUTE_BLOB_STORE_URL`` empty keeps blobs in ``workdir/server/blobs``; ``s3://BUCKET/PREFIX`` keeps them in
that bucket under that prefix, reached through ``FEDCOMPUTE_S3_*``. Either way uploads in progress are staged in
``workdir/server/blobs/tmp`` on local disk. A bucket that does not exist or cannot be used fails at start, naming
the setting to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from fedcompute.core.blobs import BlobStore
from fedcompute.core.settings import SettingError, Settings
from fedcompute.store.blobs import LocalBlobStore
from fedcompute.store.s3blobs import S3BlobStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
ATTEMPTS = 4  # boto3's standard retry mode: throttling and 5xx retried with backoff before a caller sees an error


class StagedBlobStore(BlobStore, Protocol):
    def staging_dir(self) -> Path:
        """A local directory for files later moved in with ``put_file`` (uploads in progress)."""
        ...


def open_blob_store(settings: Settings) -> StagedBlobStore:
    root = settings.blob_dir()
    if not settings.blob_store_url:
        return LocalBlobStore(root)
    bucket, prefix = parse_s3_url(settings.blob_store_url)
    client = s3_client(settings)
    check_bucket(client, bucket, settings.s3_endpoint_url)
    return S3BlobStore(client, bucket, prefix, root / "tmp")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without surrounding slashes)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def s3_client(settings: Settings) -> S3Client:
    if bool(settings.s3_access_key_id) != bool(settings.s3_secret_access_key):
        raise SettingError(
            "s3_secret_access_key",
            "give both FEDCOMPUTE_S3_ACCESS_KEY_ID and FEDCOMPUTE_S3_SECRET_ACCESS_KEY, or neither (boto3's chain)",
        )
    session = boto3.session.Session(
        aws_access_key_id=settings.s3_access_key_id or None,
        aws_secret_access_key=settings.s3_secret_access_key or None,
        region_name=settings.s3_region,
    )
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": ATTEMPTS},
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,  # S3-compatible servers want paths
    )
    return session.client("s3", endpoint_url=settings.s3_endpoint_url or None, config=config)


def check_bucket(client: S3Client, bucket: str, endpoint: str) -> None:
    """Fail at start, naming the setting, if the bucket is missing, refused or unreachable."""
    where = endpoint or "AWS"
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"404", "NoSuchBucket", "NotFound"}:
            problem = f"bucket {bucket!r} does not exist at {where}; create it or fix the URL"
        elif code in {"403", "AccessDenied", "Forbidden"}:
            problem = f"access to bucket {bucket!r} at {where} is denied; check FEDCOMPUTE_S3_ACCESS_KEY_ID"
        else:
            problem = f"bucket {bucket!r} at {where} cannot be used ({code or exc})"
        raise SettingError("blob_store_url", problem) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise SettingError(
            "s3_access_key_id", "no S3 credentials: set FEDCOMPUTE_S3_ACCESS_KEY_ID and FEDCOMPUTE_S3_SECRET_ACCESS_KEY"
        ) from None
    except (BotoConnectionError, HTTPClientError) as exc:
        raise SettingError("s3_endpoint_url", f"cannot reach the S3 store at {where}: {exc}") from None
