"""plan v2: model name and parameter count per task; aggregated metrics per round

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 13:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("model_name", sa.String(length=128), nullable=False, server_default=sa.text("''")))
        batch.add_column(sa.Column("parameter_count", sa.BigInteger(), nullable=False, server_default=sa.text("0")))
    with op.batch_alter_table("iterations") as batch:
        batch.add_column(sa.Column("metrics_json", sa.Text(), nullable=False, server_default=sa.text("''")))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("iterations") as batch:
        batch.drop_column("metrics_json")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("parameter_count")
        batch.drop_column("model_name")
