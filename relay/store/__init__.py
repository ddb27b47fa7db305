"""Relay storage: devices, certificates, revocations and presence (SQLAlchemy Core).

Synchronous and thread-safe; the trio shells call it through
``trio.to_thread.run_sync``. SQLite by default, PostgreSQL for several broker nodes.
"""

from ._records import (
    CertificateRecord as CertificateRecord,
    DeviceRecord as DeviceRecord,
    DeviceRevoked as DeviceRevoked,
    PresenceRow as PresenceRow,
    Revocation as Revocation,
    StoreError as StoreError,
    UnknownDevice as UnknownDevice,
)
from ._store import MIGRATIONS_DIR as MIGRATIONS_DIR, Store as Store

__all__ = [
    "MIGRATIONS_DIR",
    "CertificateRecord",
    "DeviceRecord",
    "DeviceRevoked",
    "PresenceRow",
    "Revocation",
    "Store",
    "StoreError",
    "UnknownDevice",
]
