"""Jobs, their events and audio uploads.

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(256), nullable=False),
        sa.Column("idempotency_key", sa.String(128)),
        sa.Column("request_hash", sa.String(64), nullable=False, server_default=""),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
        sa.Column("queued_seq", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(128)),
        sa.Column("lease_id", sa.String(32)),
        sa.Column("lease_until", sa.Float),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default="0"),
        sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("record", sa.Text, nullable=False),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant", "created_at"])
    op.create_index("ix_jobs_state_queue", "jobs", ["state", "queued_seq"])
    op.create_index("ix_jobs_owner", "jobs", ["owner"])
    op.create_table(
        "job_events",
        sa.Column(
            "job_id",
            sa.String(64),
            sa.ForeignKey("jobs.job_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(16)),
        sa.Column("scene_index", sa.Integer, nullable=False, server_default="0"),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "uploads",
        sa.Column("upload_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("uri", sa.Text),
        sa.Column("size_bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("owner", sa.String(128)),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("job_id", sa.String(64)),
    )
    op.create_index("ix_uploads_tenant_state", "uploads", ["tenant", "state"])
    op.create_index("ix_uploads_uri", "uploads", ["uri"])
    op.create_index("ix_uploads_expires", "uploads", ["expires_at"])


def downgrade() -> None:
    op.drop_table("uploads")
    op.drop_table("job_events")
    op.drop_table("jobs")
