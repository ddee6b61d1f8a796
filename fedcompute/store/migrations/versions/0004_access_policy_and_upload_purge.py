"""access policy per task; uploads purged after release

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("access_policy", sa.LargeBinary(), nullable=False, server_default=sa.text("''")))
        batch.add_column(sa.Column("policy_sha256", sa.String(length=64), nullable=False, server_default=sa.text("''")))
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("purged_at")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("policy_sha256")
        batch.drop_column("access_policy")
