"""Relay storage: devices, certificates, revocations, presence, users and login
sessions (SQLAlchemy Core).

Synchronous and thread-safe; the trio shells call it through
``trio.to_thread.run_sync``. SQLite by default, PostgreSQL for several broker nodes.
"""

from typing import TYPE_CHECKING, Any

from ._records import (
    DATA_REQUEST_STATUSES as DATA_REQUEST_STATUSES,
    MAX_DEVICE_LABELS as MAX_DEVICE_LABELS,
    MAX_USER_GROUPS as MAX_USER_GROUPS,
    USER_ROLES as USER_ROLES,
    CertificateRecord as CertificateRecord,
    DataRequestRow as DataRequestRow,
    DeviceAlreadyEnrolled as DeviceAlreadyEnrolled,
    DeviceRecord as DeviceRecord,
    DeviceRevoked as DeviceRevoked,
    FeedRow as FeedRow,
    LoginSessionRecord as LoginSessionRecord,
    NewFeedRecord as NewFeedRecord,
    PolicySubjectChange as PolicySubjectChange,
    PolicySubjectKind as PolicySubjectKind,
    PresenceRow as PresenceRow,
    RemoteSessionRecord as RemoteSessionRecord,
    Revocation as Revocation,
    SessionRevocation as SessionRevocation,
    StoreError as StoreError,
    TotpSecretChanged as TotpSecretChanged,
    UnknownDataRequest as UnknownDataRequest,
    UnknownDevice as UnknownDevice,
    UnknownUser as UnknownUser,
    UserDisabled as UserDisabled,
    UserExists as UserExists,
    UserRecord as UserRecord,
)

if TYPE_CHECKING:
    from ._store import MIGRATIONS_DIR as MIGRATIONS_DIR, Store as Store


def __getattr__(name: str) -> Any:
    # The store module pulls in SQLAlchemy and Alembic (about half a second):
    # loaded on first use, so that commands without a database (``relay shell``,
    # ``relay agent run``, ``--help``) start fast.
    if name in ("Store", "MIGRATIONS_DIR"):
        from . import _store

        return getattr(_store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATA_REQUEST_STATUSES",
    "MAX_DEVICE_LABELS",
    "MAX_USER_GROUPS",
    "MIGRATIONS_DIR",
    "USER_ROLES",
    "CertificateRecord",
    "DataRequestRow",
    "DeviceAlreadyEnrolled",
    "DeviceRecord",
    "DeviceRevoked",
    "FeedRow",
    "LoginSessionRecord",
    "NewFeedRecord",
    "PolicySubjectChange",
    "PolicySubjectKind",
    "PresenceRow",
    "RemoteSessionRecord",
    "Revocation",
    "SessionRevocation",
    "Store",
    "StoreError",
    "TotpSecretChanged",
    "UnknownDataRequest",
    "UnknownDevice",
    "UnknownUser",
    "UserDisabled",
    "UserExists",
    "UserRecord",
]
