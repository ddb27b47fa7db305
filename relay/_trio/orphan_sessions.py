"""Closing the sessions a node left open when it left the fleet for good.

Theory of operation
===================
A node that dies leaves its sessions' rows open in the shared store; when it
starts again it closes them itself, from its own audit log
(:meth:`~relay._trio.session_archive.SessionArchive.recover`). A node that
never comes back would leave them open for ever, and an auditor's listing
would show sessions that never ended. So every node looks, every
``orphan_check_s``, for open rows of nodes that are not announced in Redis,
and notes since when each such node has been missing; once one has been
missing for ``[cluster] orphan_after_s`` (long enough for a restart to run
its own recovery first), its open rows are ended as ``broker_crash`` and
this node writes their ``session.end`` into its own audit log, naming the
dead node. Of several nodes doing this at once, the store lets one end each
row (``record_session_end`` ends a row once), and only that one logs it.

While Redis is away nothing is declared gone: what cannot be checked is not
guessed. A store that cannot be read is tried again at the next check.
"""

from __future__ import annotations

from typing import Any

import trio

from relay._trio.cluster_node import ClusterNode
from relay._trio.redis_state import SharedStateUnavailable
from relay._trio.session_archive import SessionArchive
from relay.store import StoreError


class OrphanSweep:
    """See the module docstring.

    Args:
        cluster: The running cluster node (live nodes, this node's id).
        archive: Where the rows are ended and the ends logged.
        log: The broker's logger (a store failure).
    """

    def __init__(
        self, cluster: ClusterNode, archive: SessionArchive, *, log: Any
    ) -> None:
        self._cluster = cluster
        self._archive = archive
        self._log = log
        self._missing_since: dict[str, float] = {}

    async def run(self) -> None:
        """Check every ``orphan_check_s`` until cancelled."""
        config = self._cluster.config
        while True:
            await trio.sleep(config.orphan_check_s)
            await self.check()

    async def check(self) -> int:
        """One look; returns how many rows this node ended."""
        if not self._cluster.redis_up:
            self._missing_since.clear()
            return 0
        try:
            live = set(await self._cluster.live_nodes())
            rows = await trio.to_thread.run_sync(
                self._archive.open_rows_elsewhere, live | {self._cluster.node_id}
            )
        except SharedStateUnavailable:
            self._missing_since.clear()
            return 0
        except StoreError as exc:
            self._log.error("store.failed", operation="orphan_sessions", error=str(exc))
            return 0
        now = trio.current_time()
        missing = {row.node_id for row in rows}
        self._missing_since = {
            node: self._missing_since.get(node, now) for node in missing
        }
        gone = {
            node
            for node, since in self._missing_since.items()
            if now - since >= self._cluster.config.orphan_after_s
        }
        try:
            return await self._archive.close_orphans(gone)
        except StoreError as exc:
            self._log.error("store.failed", operation="orphan_sessions", error=str(exc))
            return 0


__all__ = ["OrphanSweep"]
