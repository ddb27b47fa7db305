"""Add the enroll permission to users.

Revision ID: 0003
Revises: 0002

``users.can_enroll``: an engineer may enroll devices over the API
(``POST /api/v1/enrollments``) only when it is true; admins may always, auditors
never. Existing users get false (``server_default``), so an upgrade grants
nothing. ``users.permissions_changed_at`` records when a permission last changed
(NULL: never since the user was added).

Plain ``ALTER TABLE ... ADD COLUMN`` on both SQLite and PostgreSQL, not batch
mode: SQLite adds a column with a constant default in place, whereas batch mode
would copy and swap the ``users`` table (Alembic recreates it for a SQL
expression default such as ``sa.false()``), which the foreign key of
``login_sessions`` refuses while sessions exist. The downgrade's
``DROP COLUMN`` needs SQLite 3.35 or newer.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add users.can_enroll (false for everybody) and users.permissions_changed_at."""
    op.add_column(
        "users",
        sa.Column(
            "can_enroll", sa.Boolean(), nullable=False, server_default=sa.false()
        ),
    )
    op.add_column(
        "users",
        sa.Column("permissions_changed_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    """Drop the columns added by :func:`upgrade`."""
    op.drop_column("users", "permissions_changed_at")
    op.drop_column("users", "can_enroll")
