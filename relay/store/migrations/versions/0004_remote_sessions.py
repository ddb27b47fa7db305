"""Add remote_sessions: one row per remote session, the audit log's index.

Revision ID: 0004
Revises: 0003

Auditors list sessions by device, engineer, time and end reason; the broker finds
the sessions a crash left open. The audit log stays the evidence: a row points
into it (``start_seq``) and names the recordings kept with the session.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create remote_sessions and its indexes."""
    op.create_table(
        "remote_sessions",
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("engineer", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("channels", sa.String(400), nullable=False),
        sa.Column("source", sa.String(100), nullable=False),
        sa.Column("device_fingerprint", sa.String(64), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_seq", sa.BigInteger(), nullable=False),
        sa.Column("granted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(64), nullable=True),
        sa.Column("granted_channels", sa.String(400), nullable=True),
        sa.Column("max_seconds", sa.Integer(), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
        sa.Column(
            "bytes_to_device", sa.BigInteger(), nullable=False, server_default="0"
        ),
        sa.Column(
            "bytes_from_device", sa.BigInteger(), nullable=False, server_default="0"
        ),
        sa.Column("recordings", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("session_id", name="pk_remote_sessions"),
    )
    for column in ("node_id", "device_id", "engineer", "requested_at", "end_reason"):
        op.create_index(
            f"ix_remote_sessions_{column}", "remote_sessions", [column], unique=False
        )


def downgrade() -> None:
    """Drop remote_sessions."""
    op.drop_table("remote_sessions")
