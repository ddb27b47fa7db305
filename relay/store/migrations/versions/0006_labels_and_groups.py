"""Add device labels, user groups and their change feed, for access policies.

Revision ID: 0006
Revises: 0005

Access policies match engineers by group and devices by label (see
``policies/model.py``). ``device_labels`` holds a device's labels, one row per
key (``customer``, ``site``, ``model`` ...); ``user_groups`` one row per group
of a user. ``policy_subject_changes`` is an append-only feed, like
``revocation_events``: every change of a device's labels or a user's groups
adds a row, so that a broker notices a change the CLI made in another process.
Its id is the poll cursor and is never reused (AUTOINCREMENT on SQLite, a
sequence on PostgreSQL).

Only new tables, so existing rows are untouched and nobody has labels or
groups after the upgrade. ``CREATE TABLE`` with foreign keys to existing tables
works on SQLite and PostgreSQL alike; the downgrade drops the three tables and
with them every label and group.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create device_labels, user_groups and policy_subject_changes (all empty)."""
    op.create_table(
        "device_labels",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(63), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "key", name="pk_device_labels"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name="fk_device_labels_device_id_devices",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "user_groups",
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("group_name", sa.String(63), nullable=False),
        sa.PrimaryKeyConstraint("username", "group_name", name="pk_user_groups"),
        sa.ForeignKeyConstraint(
            ["username"],
            ["users.username"],
            name="fk_user_groups_username_users",
        ),
    )
    op.create_table(
        "policy_subject_changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_policy_subject_changes"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    """Drop the tables created by :func:`upgrade`, labels and groups with them."""
    op.drop_table("policy_subject_changes")
    op.drop_table("user_groups")
    op.drop_table("device_labels")
