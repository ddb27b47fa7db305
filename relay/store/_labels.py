"""Device labels and user groups: what access policies match devices and engineers on.

Theory of operation
===================
A device carries labels (``customer=acme``, ``site=lyon``, ``model=xr-200``), a
user belongs to groups (``field-eu``, ``acme-support``); ``policies`` rules select
on both. The CLI changes them, in its own process, while brokers run; a broker
learns of a change from the ``policy_subject_changes`` feed, which it polls with a
cursor like the revocation feeds (see :mod:`relay.store._store`), and then reads
the subject again.

Rule 1: keys, values and group names are checked against the patterns of
        :mod:`policies.model` (``LABEL_KEY``, ``LABEL_VALUE``, ``GROUP_NAME``)
        before any SQL runs, so the store never holds what a policy cannot name.
Rule 2: a write that changes something appends exactly one feed row, in the
        same transaction; a write that changes nothing appends none.
Rule 3: writers lock the feed table first on PostgreSQL (ids must become visible
        in increasing order, as for ``revocation_events``), then the subject's
        row (``FOR UPDATE``), so concurrent changes of one subject serialise and
        every writer takes the locks in the same order.

The methods live in :class:`Labels`, a mixin of :class:`relay.store.Store`; the
module-level helpers serve ``Store.add_user``, ``get_user``, ``list_users`` and
``list_devices``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Table,
    delete,
    func,
    insert,
    select,
    text,
)

from policies.model import GROUP_NAME, LABEL_KEY, LABEL_VALUE

from ._records import (
    MAX_DEVICE_LABELS,
    MAX_USER_GROUPS,
    PolicySubjectChange,
    PolicySubjectKind,
    UnknownDevice,
    UnknownUser,
)
from ._schema import (
    device_labels,
    devices,
    policy_subject_changes,
    user_groups,
    users,
)

_KEY_RULE = "a lowercase letter, then up to 62 of a-z 0-9 _ . -"
_VALUE_RULE = "1 to 128 of A-Z a-z 0-9 _ . : / @ + - and spaces, no space at either end"
_GROUP_RULE = "a lowercase letter or digit, then up to 62 of a-z 0-9 _ . -"


class Labels:
    """The store's label and group methods (mixed into :class:`Store`)."""

    def _transaction(self, *, write: bool) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # pragma: no cover - Store provides it

    def _read_feed(
        self,
        table: Table,
        columns: tuple[ColumnElement[Any], ...],
        cursor: int,
        limit: int,
    ) -> tuple[Sequence[Row[Any]], int]:
        raise NotImplementedError  # pragma: no cover - Store provides it

    def device_labels(self, device_id: str) -> dict[str, str]:
        """The labels of *device_id*, key to value.

        Returns:
            The labels; empty for a device without any, or for an unknown id.

        Raises:
            StoreError: The database failed.
        """
        with self._transaction(write=False) as connection:
            return _labels_of(connection, device_id)

    def device_enrolled(self, device_id: str) -> bool:
        """Whether *device_id* was ever enrolled (revoked devices included).

        Raises:
            StoreError: The database failed.
        """
        with self._transaction(write=False) as connection:
            found = connection.execute(
                select(devices.c.device_id).where(devices.c.device_id == device_id)
            ).first()
        return found is not None

    def set_device_labels(
        self,
        device_id: str,
        *,
        # Shadows the builtin inside this method (unused here): the callers'
        # word for it, next to remove=.
        set: Mapping[str, str],
        remove: Collection[str],
        at: datetime,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Set and remove labels of a device, in one transaction.

        Example: labels ``{"site": "lyon", "model": "xr"}``, ``set={"site":
        "paris"}``, ``remove={"model", "rack"}`` gives ``{"site": "paris"}``;
        removing a key the device does not have (``rack``) is no error.

        Args:
            device_id: The device; revoked devices may be labelled too.
            set: Labels to add or overwrite.
            remove: Keys to remove; none of them may also be in *set*.
            at: Time of the change (aware), recorded in the change feed.

        Returns:
            The labels before and after. When they are equal nothing was written
            and the change feed did not move.

        Raises:
            UnknownDevice: *device_id* was never enrolled.
            StoreError: The database failed.
            ValueError: A key or value that ``policies.model.LABEL_KEY`` or
                ``LABEL_VALUE`` refuses (the message names the key), a key both
                set and removed, more than :data:`MAX_DEVICE_LABELS` labels
                after the change, or a naive *at*.
        """
        changes = _checked_labels(set)
        removals = _checked_names(remove, "remove")
        for key in removals:
            if not LABEL_KEY.fullmatch(key):
                raise ValueError(f"invalid label key {key!r}: {_KEY_RULE}")
        both = removals & changes.keys()
        if both:
            raise ValueError(f"label {min(both)!r} is both set and removed")
        _check_aware(at)
        with self._transaction(write=True) as connection:
            _lock_feed(connection)
            found = connection.execute(
                select(devices.c.device_id)
                .where(devices.c.device_id == device_id)
                .with_for_update()
            ).first()
            if found is None:
                raise UnknownDevice(f"no device {device_id!r}")
            previous = _labels_of(connection, device_id)
            new = {k: v for k, v in previous.items() if k not in removals}
            new.update(changes)
            if len(new) > MAX_DEVICE_LABELS:
                raise ValueError(
                    f"device {device_id!r} would have {len(new)} labels; "
                    f"at most {MAX_DEVICE_LABELS}"
                )
            if new == previous:
                return previous, new
            stale = [k for k, v in previous.items() if new.get(k) != v]
            fresh = [
                {"device_id": device_id, "key": k, "value": v}
                for k, v in new.items()
                if previous.get(k) != v
            ]
            if stale:
                connection.execute(
                    delete(device_labels).where(
                        device_labels.c.device_id == device_id,
                        device_labels.c.key.in_(stale),
                    )
                )
            if fresh:
                connection.execute(insert(device_labels), fresh)
            _append_change(connection, PolicySubjectKind.DEVICE_LABELS, device_id, at)
        return previous, new

    def user_groups(self, username: str) -> frozenset[str]:
        """The groups of *username* (empty for a user in none, or an unknown name).

        Raises:
            StoreError: The database failed.
        """
        with self._transaction(write=False) as connection:
            return groups_by_user(connection, username).get(username, frozenset())

    def set_user_groups(
        self,
        username: str,
        *,
        add: Collection[str],
        remove: Collection[str],
        at: datetime,
    ) -> tuple[frozenset[str], frozenset[str]]:
        """Add a user to groups and remove it from others, in one transaction.

        Adding a group the user is in, or removing one it is not in, is no error.

        Args:
            username: The user; disabled users may be changed too.
            add: Groups to join.
            remove: Groups to leave; none of them may also be in *add*.
            at: Time of the change (aware), recorded in the change feed.

        Returns:
            The groups before and after. When they are equal nothing was written
            and the change feed did not move.

        Raises:
            UnknownUser: There is no such user.
            StoreError: The database failed.
            ValueError: A group name that ``policies.model.GROUP_NAME`` refuses,
                a group both added and removed, more than
                :data:`MAX_USER_GROUPS` groups after the change, or a naive *at*.
        """
        joins = check_group_names(add, "add")
        leaves = check_group_names(remove, "remove")
        both = joins & leaves
        if both:
            raise ValueError(f"group {min(both)!r} is both added and removed")
        _check_aware(at)
        with self._transaction(write=True) as connection:
            _lock_feed(connection)
            found = connection.execute(
                select(users.c.username)
                .where(users.c.username == username)
                .with_for_update()
            ).first()
            if found is None:
                raise UnknownUser(f"no user {username!r}")
            previous = groups_by_user(connection, username).get(username, frozenset())
            new = (previous - leaves) | joins
            if len(new) > MAX_USER_GROUPS:
                raise ValueError(
                    f"user {username!r} would be in {len(new)} groups; "
                    f"at most {MAX_USER_GROUPS}"
                )
            if new == previous:
                return previous, new
            gone = previous - new
            if gone:
                connection.execute(
                    delete(user_groups).where(
                        user_groups.c.username == username,
                        user_groups.c.group_name.in_(sorted(gone)),
                    )
                )
            _insert_user_groups(connection, username, new - previous)
            _append_change(connection, PolicySubjectKind.USER_GROUPS, username, at)
        return previous, new

    def policy_subject_cursor(self) -> int:
        """Return the id of the newest policy subject change, or ``0`` if none.

        A starting broker polls from here: it reads labels and groups afresh
        for every decision it caches after that.

        Raises:
            StoreError: The database failed.
        """
        with self._transaction(write=False) as connection:
            newest = connection.execute(
                select(func.coalesce(func.max(policy_subject_changes.c.id), 0))
            ).scalar_one()
        return int(newest)

    def policy_subject_changes_after(
        self, cursor: int, *, limit: int = 1000
    ) -> list[PolicySubjectChange]:
        """Read the policy subject change feed after *cursor*.

        Args:
            cursor: The last change id already handled (``0`` for the beginning).
            limit: At most this many changes are returned; call again with the
                last one's ``id`` to read on.

        Returns:
            The changes with an id greater than *cursor*, oldest first. One
            subject may appear several times.

        Raises:
            StoreError: The database failed.
            ValueError: *cursor* is negative or *limit* is not positive.
        """
        c = policy_subject_changes.c
        rows, _ = self._read_feed(
            policy_subject_changes, (c.kind, c.subject), cursor, limit
        )
        return [
            PolicySubjectChange(
                kind=PolicySubjectKind(row.kind), subject=row.subject, id=row.id
            )
            for row in rows
        ]


def check_group_names(groups: Collection[str], name: str) -> frozenset[str]:
    """Return *groups* as a set after checking each against ``GROUP_NAME``.

    Args:
        groups: Group names.
        name: The argument's name, for the error message.

    Raises:
        ValueError: A name is malformed, or *groups* is a single string (which
            would otherwise be taken as its characters).
    """
    names = _checked_names(groups, name)
    for group in sorted(names):
        if not GROUP_NAME.fullmatch(group):
            raise ValueError(f"invalid group name {group!r}: {_GROUP_RULE}")
    return names


def add_new_user_groups(
    connection: Connection, username: str, groups: Collection[str], *, at: datetime
) -> None:
    """Put a user just inserted into checked *groups*, and feed the change.

    Nothing is written when *groups* is empty.

    Args:
        connection: The write transaction that inserted the user.
        username: The new user.
        groups: Names checked with :func:`check_group_names`.
        at: Time of the change.
    """
    if not groups:
        return
    # The new row is invisible to other transactions, so taking the feed lock
    # after it cannot deadlock with set_user_groups (Rule 3).
    _lock_feed(connection)
    _insert_user_groups(connection, username, groups)
    _append_change(connection, PolicySubjectKind.USER_GROUPS, username, at)


def groups_by_user(
    connection: Connection, username: str | None = None
) -> dict[str, frozenset[str]]:
    """The groups of *username*, or of every user, keyed by username.

    Users in no group are missing from the result.
    """
    statement = select(user_groups.c.username, user_groups.c.group_name)
    if username is not None:
        statement = statement.where(user_groups.c.username == username)
    found: dict[str, set[str]] = {}
    for row in connection.execute(statement):
        found.setdefault(row.username, set()).add(row.group_name)
    return {name: frozenset(groups) for name, groups in found.items()}


def labels_by_device(connection: Connection) -> dict[str, dict[str, str]]:
    """The labels of every device, keyed by device id, keys in order.

    Devices without labels are missing from the result.
    """
    found: dict[str, dict[str, str]] = {}
    rows = connection.execute(
        select(
            device_labels.c.device_id, device_labels.c.key, device_labels.c.value
        ).order_by(device_labels.c.device_id, device_labels.c.key)
    )
    for row in rows:
        found.setdefault(row.device_id, {})[row.key] = row.value
    return found


def _insert_user_groups(
    connection: Connection, username: str, groups: Iterable[str]
) -> None:
    """Insert one row per group of *groups* (nothing if empty)."""
    rows = [{"username": username, "group_name": g} for g in sorted(groups)]
    if rows:
        connection.execute(insert(user_groups), rows)


def _labels_of(connection: Connection, device_id: str) -> dict[str, str]:
    """The labels of one device, keys in order."""
    rows = connection.execute(
        select(device_labels.c.key, device_labels.c.value)
        .where(device_labels.c.device_id == device_id)
        .order_by(device_labels.c.key)
    )
    return {row.key: row.value for row in rows}


def _checked_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Return *labels* as a dict after checking keys and values (Rule 1).

    Raises:
        ValueError: A key or value is malformed; the message names the key.
    """
    if not isinstance(labels, Mapping):
        raise ValueError(f"set must be a mapping of key to value, got {labels!r}")
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise ValueError(f"invalid label key {key!r}: {_KEY_RULE}")
        if not LABEL_VALUE.fullmatch(value):
            raise ValueError(f"invalid value {value!r} of label {key!r}: {_VALUE_RULE}")
        checked[key] = value
    return checked


def _checked_names(names: Collection[str], name: str) -> frozenset[str]:
    """Return *names* as a set of strings.

    Raises:
        ValueError: *names* is a single string, or holds something else.
    """
    if isinstance(names, str | bytes):
        raise ValueError(f"{name} must be a collection of names, not one string")
    result = frozenset(names)
    for item in result:
        if not isinstance(item, str):
            raise ValueError(f"{name} must hold strings, got {item!r}")
    return result


def _check_aware(at: datetime) -> None:
    """Refuse a naive *at* (the store's Rule 3).

    Raises:
        ValueError: *at* has no UTC offset.
    """
    if at.utcoffset() is None:
        raise ValueError(f"at must be timezone-aware, got {at!r}")


def _lock_feed(connection: Connection) -> None:
    """Serialise writers of ``policy_subject_changes`` on PostgreSQL (Rule 3).

    SQLite needs nothing: it has one writer.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("LOCK TABLE policy_subject_changes IN EXCLUSIVE MODE"))


def _append_change(
    connection: Connection, kind: PolicySubjectKind, subject: str, at: datetime
) -> None:
    """Append one row to the change feed (Rule 2)."""
    connection.execute(
        insert(policy_subject_changes).values(
            kind=kind.value, subject=subject, changed_at=at
        )
    )


def note_user_change(connection: Connection, username: str, at: datetime) -> None:
    """Tell brokers that *username* changed in what policies see of it.

    For a change outside this module (a customer's organisation): takes the
    feed lock first (Rule 3); call it before touching the user's row.
    """
    _lock_feed(connection)
    _append_change(connection, PolicySubjectKind.USER_GROUPS, username, at)
