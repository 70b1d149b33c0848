"""What the composer's probe found in each upload: its length and codec.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: uploads stored before this revision were never probed.
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("duration_s", sa.Float))
        batch.add_column(sa.Column("codec", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("codec")
        batch.drop_column("duration_s")
