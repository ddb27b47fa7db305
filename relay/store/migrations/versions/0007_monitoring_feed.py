"""Add the monitoring feed and customers.

Revision ID: 0007
Revises: 0006

``feed_records`` holds what instruments deliver (alarms, daily statistics,
configuration and consumables snapshots); ``(device_id, record_id)`` is unique
because ``record_id`` is the agent's idempotency key, so a record delivered
twice is stored once. ``data_requests`` holds users' requests for the
request-only data and how each ended. ``users.organisation`` names a
customer's organisation (NULL for every existing user, none of whom is a
customer).

New tables and one nullable column: existing rows are untouched, on SQLite and
PostgreSQL alike. The downgrade drops the tables, and with them every record
and request, and the column (SQLite rebuilds the table for that in batch mode).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create feed_records and data_requests (empty); add users.organisation."""
    op.create_table(
        "feed_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("severity", sa.String(16), nullable=True),
        sa.Column("code", sa.String(32), nullable=True),
        sa.Column("request_id", sa.String(32), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_feed_records"),
        sa.UniqueConstraint(
            "device_id", "record_id", name="uq_feed_records_device_record"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_feed_records_received_at", "feed_records", ["received_at"])
    op.create_index(
        "ix_feed_records_device_kind_time",
        "feed_records",
        ["device_id", "kind", "device_time"],
    )
    op.create_table(
        "data_requests",
        sa.Column("request_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("refusal", sa.String(32), nullable=True),
        sa.Column("record_id", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("request_id", name="pk_data_requests"),
    )
    op.create_index(
        "ix_data_requests_device_time",
        "data_requests",
        ["device_id", "requested_at"],
    )
    op.add_column("users", sa.Column("organisation", sa.String(128), nullable=True))


def downgrade() -> None:
    """Undo :func:`upgrade`: records, requests and organisations are gone."""
    with op.batch_alter_table("users") as batch:
        batch.drop_column("organisation")
    op.drop_index("ix_data_requests_device_time", table_name="data_requests")
    op.drop_table("data_requests")
    op.drop_index("ix_feed_records_device_kind_time", table_name="feed_records")
    op.drop_index("ix_feed_records_received_at", table_name="feed_records")
    op.drop_table("feed_records")
