"""The device list pushed to engineers' consoles on ``/api/v1/events``.

Theory of operation
===================
One :class:`DeviceFeed` per broker re-reads the device list from the store every
``device_feed_interval_s`` (2 s), but only while at least one socket listens, and
publishes it under a new version number when it changed. Every socket waits for a
version newer than the one it sent last (:meth:`DeviceFeed.newer_than`) and then
sends the newest list. So the store is read once per interval whatever the number
of consoles, and a slow socket skips versions instead of queueing them: nothing
grows with a client that does not read.

The list comes from the store, not from this node's own connections, so it is the
same on every node of a cluster (presence is mirrored there, see
:mod:`relay.presence`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from relay.metrics import RelayMetrics
from relay.store import StoreError

__all__ = ["DeviceFeed"]

DeviceList = list[dict[str, Any]]


class DeviceFeed:
    """The device list, re-read while anybody listens, shared by every listener.

    Args:
        read: Reads the current device list (JSON-ready dicts) from the store.
        interval_s: Time between two reads.
        metrics: Where store failures are counted.
        log: Structured logger.
    """

    def __init__(
        self,
        *,
        read: Callable[[], Awaitable[DeviceList]],
        interval_s: float,
        metrics: RelayMetrics,
        log: Any,
    ) -> None:
        self._read = read
        self._interval_s = interval_s
        self._metrics = metrics
        self._log = log
        self._version = 0
        self._devices: DeviceList = []
        self._changed = trio.Event()
        self._listeners = 0
        self._wanted = trio.Event()

    @contextmanager
    def listening(self) -> Iterator[None]:
        """Count a listener for as long as the block runs (the feed reads meanwhile)."""
        self._listeners += 1
        self._wanted.set()
        try:
            yield
        finally:
            self._listeners -= 1

    async def newer_than(self, version: int) -> tuple[int, DeviceList]:
        """Wait for a list newer than *version*; returns its version and the list."""
        while self._version <= version:
            await self._changed.wait()
        return self._version, self._devices

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read and publish until cancelled."""
        task_status.started()
        while True:
            if self._listeners == 0:
                self._wanted = trio.Event()
                await self._wanted.wait()
            try:
                devices = await self._read()
            except StoreError as exc:
                self._metrics.store_errors.labels("device_feed").inc()
                self._log.error("store.failed", operation="device_feed", error=str(exc))
            else:
                if self._version == 0 or devices != self._devices:
                    self._publish(devices)
            await trio.sleep(self._interval_s)

    def _publish(self, devices: DeviceList) -> None:
        self._version += 1
        self._devices = devices
        changed, self._changed = self._changed, trio.Event()
        changed.set()
