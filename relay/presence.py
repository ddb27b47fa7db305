"""Which devices are connected, where, since when.

Theory of operation
===================
The device listener reports each control channel's life to a
:class:`PresenceRegistry`: ``connected`` when the hello was accepted, ``touched``
on every message, ``disconnected`` when it closed. The registry answers "is device D
online, and on which node?". :class:`LocalPresence` keeps that in this process (the
embedded default); a Redis-backed registry will implement the same interface for
several broker nodes (the scale-out issue), which is why connection *handles* (the
things that can be closed) are not kept here but in the listener: a registry entry
may describe a connection held by another node.

Rule: a ``disconnected`` for a connection that has since been replaced is ignored:
each entry carries the ``connection_id`` it was registered with.

The registry also tracks which entries changed since the last
:meth:`LocalPresence.take_changes`, so that the store mirror (what ``relay device
list`` reads from another process) writes only the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class DevicePresence:
    """One connected device, as the registry knows it."""

    device_id: str
    connection_id: int
    node_id: str
    connected_since: datetime
    last_seen: datetime
    agent_version: str
    peer: str


class PresenceRegistry(Protocol):
    """What the listener needs from a presence registry."""

    def connected(self, presence: DevicePresence) -> DevicePresence | None:
        """Record a new connection; return the entry it replaced, if any."""
        ...

    def touched(self, device_id: str, connection_id: int, at: datetime) -> None:
        """Record that the connection is alive at *at*."""
        ...

    def disconnected(self, device_id: str, connection_id: int) -> bool:
        """Forget the connection; False if it had already been replaced."""
        ...

    def get(self, device_id: str) -> DevicePresence | None:
        """The current entry of *device_id*, if it is connected."""
        ...

    def count(self) -> int:
        """Number of connected devices."""
        ...


class LocalPresence:
    """In-process presence registry (single broker node)."""

    def __init__(self) -> None:
        self._entries: dict[str, DevicePresence] = {}
        self._changed: set[str] = set()
        self._touched: set[str] = set()

    def connected(self, presence: DevicePresence) -> DevicePresence | None:
        previous = self._entries.get(presence.device_id)
        self._entries[presence.device_id] = presence
        self._changed.add(presence.device_id)
        return previous

    def touched(self, device_id: str, connection_id: int, at: datetime) -> None:
        entry = self._entries.get(device_id)
        if entry is not None and entry.connection_id == connection_id:
            self._entries[device_id] = replace(entry, last_seen=at)
            self._touched.add(device_id)

    def disconnected(self, device_id: str, connection_id: int) -> bool:
        entry = self._entries.get(device_id)
        if entry is None or entry.connection_id != connection_id:
            return False
        del self._entries[device_id]
        self._changed.add(device_id)
        return True

    def get(self, device_id: str) -> DevicePresence | None:
        return self._entries.get(device_id)

    def count(self) -> int:
        return len(self._entries)

    def all(self) -> list[DevicePresence]:
        """Every entry, ordered by device id."""
        return [self._entries[key] for key in sorted(self._entries)]

    def take_changes(
        self, *, include_touched: bool
    ) -> tuple[list[DevicePresence], list[str]]:
        """Entries to upsert and device ids to delete since the last call.

        Args:
            include_touched: Also return entries whose only change is ``last_seen``
                (the mirror writes those less often than connects and disconnects).
        """
        ids = set(self._changed)
        self._changed.clear()
        if include_touched:
            ids |= self._touched
            self._touched.clear()
        upserts = [self._entries[key] for key in sorted(ids) if key in self._entries]
        deletes = sorted(key for key in ids if key not in self._entries)
        return upserts, deletes
