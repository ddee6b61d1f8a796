"""Which blobs the store still refers to: anything else in the blob store is an orphan (a crash between storing
an upload and the commit that would have counted it), swept after a grace period."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedcompute.store.models import JobRow, ModelVersionRow, UploadRow


def referenced_blobs(session: Session) -> set[str]:
    uploads = session.scalars(select(UploadRow.blob_sha256).where(UploadRow.blob_sha256.is_not(None)))
    versions = session.scalars(select(ModelVersionRow.checkpoint_sha256))
    updates = session.scalars(select(JobRow.update_sha256).where(JobRow.update_sha256.is_not(None)))
    return {sha for sha in [*uploads, *versions, *updates] if sha}
