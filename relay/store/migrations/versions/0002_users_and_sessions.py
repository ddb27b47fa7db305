"""Add users, login sessions and the login session revocation feed.

Revision ID: 0002
Revises: 0001

Spelled out rather than derived from ``_schema.py``, like 0001: a migration is a
frozen snapshot. Existing tables and their rows are not touched.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create users, login_sessions and login_session_revocations."""
    op.create_table(
        "users",
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("totp_secret_sealed", sa.String(200), nullable=False),
        sa.Column("totp_last_step", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("username", name="pk_users"),
    )
    op.create_table(
        "login_sessions",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_reason", sa.String(200), nullable=True),
        sa.Column("source", sa.String(100), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name="pk_login_sessions"),
        sa.ForeignKeyConstraint(
            ["username"],
            ["users.username"],
            name="fk_login_sessions_username_users",
        ),
    )
    op.create_index("ix_login_sessions_username", "login_sessions", ["username"])
    op.create_table(
        "login_session_revocations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_login_session_revocations"),
        # The id is the brokers' poll cursor; see revocation_events in 0001.
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    """Drop every table created by :func:`upgrade`, dependants first."""
    op.drop_table("login_session_revocations")
    op.drop_index("ix_login_sessions_username", table_name="login_sessions")
    op.drop_table("login_sessions")
    op.drop_table("users")
