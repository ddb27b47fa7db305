"""Create the initial relay store schema.

Revision ID: 0001
Revises: (none)

The tables are spelled out here instead of calling ``metadata.create_all``: a
migration is a frozen snapshot, and must keep creating this exact schema after
``relay/store/_schema.py`` has moved on. Constraint names follow the naming
convention of ``_schema.NAMING_CONVENTION`` so later migrations can refer to them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create devices, certificates, revocation_events and device_presence."""
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_reason", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("device_id", name="pk_devices"),
    )
    op.create_table(
        "certificates",
        sa.Column("serial_hex", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("fingerprint_sha256", sa.String(64), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("serial_hex", name="pk_certificates"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name="fk_certificates_device_id_devices",
        ),
        sa.UniqueConstraint(
            "fingerprint_sha256", name="uq_certificates_fingerprint_sha256"
        ),
    )
    op.create_index("ix_certificates_device_id", "certificates", ["device_id"])
    op.create_table(
        "revocation_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("serial_hex", sa.String(64), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_revocation_events"),
        # The id is the broker's poll cursor: on SQLite, AUTOINCREMENT guarantees it
        # is never reused. PostgreSQL ignores this flag and uses a sequence.
        sqlite_autoincrement=True,
    )
    op.create_table(
        "device_presence",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("connected_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        sa.Column("peer", sa.String(100), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_presence"),
    )
    op.create_index("ix_device_presence_node_id", "device_presence", ["node_id"])


def downgrade() -> None:
    """Drop every table created by :func:`upgrade`, dependants first."""
    op.drop_index("ix_device_presence_node_id", table_name="device_presence")
    op.drop_table("device_presence")
    op.drop_table("revocation_events")
    op.drop_index("ix_certificates_device_id", table_name="certificates")
    op.drop_table("certificates")
    op.drop_table("devices")
