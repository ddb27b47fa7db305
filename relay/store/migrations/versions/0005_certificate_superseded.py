"""Mark device certificates superseded by a renewal.

Revision ID: 0005
Revises: 0004

``certificates.superseded_at``: set when the device first authenticated with a
newer certificate (a renewal over the control channel, see
docs/certificates.md). A superseded certificate is refused at the next
handshake, like a revoked one, with its own reason; unlike a revocation it
says nothing bad about the device, so it is not in the revocation feed.

Plain ``ALTER TABLE ... ADD COLUMN`` (a nullable column), as in 0003. The
downgrade's ``DROP COLUMN`` needs SQLite 3.35 or newer.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add certificates.superseded_at (NULL: in use or never replaced)."""
    op.add_column(
        "certificates",
        sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    """Drop certificates.superseded_at."""
    op.drop_column("certificates", "superseded_at")
