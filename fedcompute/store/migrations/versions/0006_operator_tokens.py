"""operator auth: bearer tokens for TaskManagementService, stored as sha256 only

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 09:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "operator_tokens",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256"),
    )
    with op.batch_alter_table("operator_tokens") as batch:
        batch.create_index(batch.f("ix_operator_tokens_name"), ["name"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("operator_tokens") as batch:
        batch.drop_index(batch.f("ix_operator_tokens_name"))
    op.drop_table("operator_tokens")
