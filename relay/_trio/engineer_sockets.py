"""Live engineer WebSockets, and ending them when their login session ends.

Theory of operation
===================
Every engineer WebSocket (the event feed now, a remote session's attach socket
later) runs inside :meth:`EngineerSockets.hold`. The hold registers the socket
under its login session's token hash and carries a cancel scope: ending the hold
cancels whatever the route is doing with the socket, and the route then closes
the socket with the hold's close code (:data:`CloseCode.LOGIN_ENDED`) and reason.

A login session ends in four ways, and each one ends its sockets:

- **Logout on this node**: the logout route calls :meth:`end_login_session` at
  once, before it answers.
- **Elsewhere**: logout on another node, ``relay user disable`` and ``relay user
  reset-totp`` (another process) all append to the store's session revocation
  feed, which :meth:`watch` reads every ``revocation_poll_s`` (1 s). With the
  close handshake this keeps the budget of 5 s.
- **Absolute timeout** (12 h): each hold knows when its session ends at the
  latest; :meth:`watch` ends it then.
- **Idle timeout** (15 min): each hold keeps an estimate of when its session
  idles out. When the estimate has passed, :meth:`watch` asks the store (an HTTP
  request with the same token may have used the session since) and ends the hold
  only if the session is really over; otherwise it takes the new estimate.
  Engineer input on a socket counts as use (:meth:`SocketHold.mark_used`, called
  by routes that take input): :meth:`watch` touches those sessions every
  ``session_touch_s``. A socket that only listens, like the event feed, does not
  keep its session alive, so an unattended console is logged out on time.

If the store cannot be read, :meth:`watch` counts and logs the failure and keeps
the sockets: a database hiccup must not log every engineer out. Logouts on this
node still end their sockets at once; the feed is read from the same cursor when
the store is back, so no revocation is lost, only delayed.

Everything here runs in the broker's trio thread; the store is called through
the :class:`~relay._trio.login_service.LoginService`, in worker threads.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import trio

import auth
from relay._trio.login_service import LoginService, Principal
from relay.config import EngineerListenerConfig
from relay.metrics import RelayMetrics
from relay.proto.close import CloseCode
from relay.store import Store, StoreError

__all__ = ["EngineerSockets", "SocketEnd", "SocketHold"]


class SocketEnd(enum.Enum):
    """Why the broker ends an engineer WebSocket; the value is the close reason."""

    LOGOUT = "logged out"
    REVOKED = "login revoked"
    EXPIRED = "login expired"

    @property
    def close_code(self) -> int:
        """The close code sent with this end: all of them mean "log in again"."""
        return int(CloseCode.LOGIN_ENDED)

    @property
    def label(self) -> str:
        """A bounded metric label."""
        return self.name.lower()


@dataclass(eq=False, slots=True, kw_only=True)
class SocketHold:
    """One live engineer WebSocket, as the registry sees it.

    The route runs its work inside ``with hold.cancel_scope:``; when the scope
    was cancelled, :attr:`end_reason` says why, and the route closes the socket
    with it.
    """

    principal: Principal
    #: When the session ends at the latest (login + absolute lifetime).
    absolute_end: datetime
    #: Current estimate of the session's end (idle or absolute, whichever first).
    ends_at: datetime
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    end_reason: SocketEnd | None = None
    used: bool = False
    #: Called once the route has closed the socket (or found it closed), for
    #: handlers that time their teardown.
    after_close: list[Callable[[], None]] = field(default_factory=list)

    def mark_used(self) -> None:
        """Count engineer input on this socket as use of its login session."""
        self.used = True

    def end(self, reason: SocketEnd) -> None:
        """End the socket's work; the first reason given is the one kept."""
        if self.end_reason is None:
            self.end_reason = reason
        self.cancel_scope.cancel()


class EngineerSockets:
    """The registry of live engineer WebSockets, by login session.

    Args:
        login: Session checks and touches (store calls in worker threads).
        store: For the session revocation feed.
        config: Poll and touch intervals.
        metrics: Where open sockets and store failures are counted.
        log: Structured logger.
        wall_clock: The current time, timezone-aware (sessions are stored in it).
        monotonic: Seconds on a monotonic clock (touch intervals).
    """

    def __init__(
        self,
        *,
        login: LoginService,
        store: Store,
        config: EngineerListenerConfig,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], datetime],
        monotonic: Callable[[], float] = trio.current_time,
    ) -> None:
        self._login = login
        self._store = store
        self._config = config
        self._metrics = metrics
        self._log = log
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._holds: dict[str, set[SocketHold]] = {}
        self._cursor = 0  # read by watch() before anything is accepted
        self._cursor_lock = trio.Lock()

    def __len__(self) -> int:
        return sum(len(holds) for holds in self._holds.values())

    @contextmanager
    def hold(self, principal: Principal) -> Iterator[SocketHold]:
        """Register a socket of *principal*'s session for as long as the block runs.

        The session was found live just now (the route authenticated it), so
        the first idle estimate starts from now.
        """
        lifetime = self._login.lifetime
        absolute_end = principal.created_at + lifetime.absolute
        hold = SocketHold(
            principal=principal,
            absolute_end=absolute_end,
            ends_at=min(self._wall_clock() + lifetime.idle, absolute_end),
        )
        self._holds.setdefault(principal.token_hash, set()).add(hold)
        self._metrics.engineer_websockets.inc()
        try:
            yield hold
        finally:
            holds = self._holds[principal.token_hash]
            holds.discard(hold)
            if not holds:
                del self._holds[principal.token_hash]
            self._metrics.engineer_websockets.dec()

    def end_login_session(self, token_hash: str, reason: SocketEnd) -> int:
        """End every socket of one login session; returns how many there were."""
        holds = list(self._holds.get(token_hash, ()))
        for hold in holds:
            hold.end(reason)
        if holds:
            principal = holds[0].principal
            self._log.info(
                "engineer.sockets_ended",
                username=principal.username,
                token_hash=token_hash[:12],
                reason=reason.label,
                sockets=len(holds),
                audit=True,
            )
        return len(holds)

    async def watch(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """End sockets of sessions revoked elsewhere or timed out; runs until cancelled.

        The feed cursor is read before ``task_status.started()``, so start this
        before the listener accepts: a revocation is then either seen by a
        socket's own authentication or by this feed.
        """
        self._cursor = await trio.to_thread.run_sync(
            self._store.session_revocation_cursor
        )
        task_status.started()
        last_touch = self._monotonic()
        while True:
            await trio.sleep(self._config.revocation_poll_s)
            await self.revocations_now()
            await self._check_expiry()
            if self._monotonic() - last_touch >= self._config.session_touch_s:
                last_touch = self._monotonic()
                await self._touch_used()

    async def revocations_now(self) -> bool:
        """Read the login-session revocation feed now (also what the poll
        does) and end the sockets it names; False if the store could not be
        read. One reader at a time: the cursor is shared."""
        async with self._cursor_lock:
            try:
                while True:
                    revocations, new_cursor = await trio.to_thread.run_sync(
                        self._store.session_revocations_after, self._cursor
                    )
                    for revocation in revocations:
                        self.end_login_session(revocation.token_hash, SocketEnd.REVOKED)
                    if new_cursor == self._cursor:
                        return True
                    self._cursor = new_cursor
            except StoreError as exc:
                self._store_failed("session_revocations_after", exc)
                return False

    async def _check_expiry(self) -> None:
        now = self._wall_clock()
        due = [
            token_hash
            for token_hash, holds in self._holds.items()
            if any(hold.ends_at <= now for hold in holds)
        ]
        for token_hash in due:
            try:
                ends_at: datetime | None = await self._login.session_end(token_hash)
            except auth.InvalidToken as error:
                ends_at = None
                reason = (
                    SocketEnd.REVOKED
                    if error.reason == "revoked"
                    else SocketEnd.EXPIRED
                )
            except StoreError as exc:
                self._store_failed("session_end", exc)
                return
            if ends_at is None:
                self.end_login_session(token_hash, reason)
                continue
            for hold in self._holds.get(token_hash, ()):
                hold.ends_at = ends_at

    async def _touch_used(self) -> None:
        used = [
            token_hash
            for token_hash, holds in self._holds.items()
            if any(hold.used for hold in holds)
        ]
        for token_hash in used:
            try:
                await self._login.touch(token_hash)
            except StoreError as exc:
                self._store_failed("touch_login_session", exc)
                return
            lifetime = self._login.lifetime
            now = self._wall_clock()
            for hold in self._holds.get(token_hash, ()):
                hold.used = False
                hold.ends_at = min(now + lifetime.idle, hold.absolute_end)

    def _store_failed(self, operation: str, exc: StoreError) -> None:
        self._metrics.store_errors.labels(operation).inc()
        self._log.error("store.failed", operation=operation, error=str(exc))
