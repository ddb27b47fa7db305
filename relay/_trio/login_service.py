"""Engineer login and session checks, with their abuse limits.

Theory of operation
===================
:class:`LoginService` is the thin trio shell around the pure ``auth`` code and the
store: it owns the abuse tables (a :class:`auth.RateLimiter` per client address and
a :class:`auth.LoginThrottle` per account and address), runs argon2 and every store
call in worker threads, counts every refusal and writes audit events. It holds no
rules of its own beyond the order of the checks; the order and the answers are
described in :mod:`relay._trio.engineer_api`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Final

import trio
from starlette.requests import HTTPConnection

import auth
from relay.api_contract import SESSION_COOKIE
from relay.config import EngineerAuthConfig
from relay.metrics import RelayMetrics
from relay.store import (
    DeviceRecord,
    Store,
    TotpSecretChanged,
    UnknownUser,
    UserDisabled,
    UserRecord,
)
from relay.users import totp_context, totp_policy

__all__ = ["LoginResult", "LoginService", "LoginThrottled", "Principal"]

#: Longest user name written to an audit event, as given by the client.
MAX_LOGGED_USERNAME_CHARS: Final = 64

_FACTORS: Final[Mapping[str, str]] = {
    "unknown_user": "user",
    "user_disabled": "user",
    "bad_password": "password",
    "password_hash_unreadable": "password",
    "bad_totp": "totp",
    "totp_reused": "totp",
    "totp_reset": "totp",
    "totp_secret_unreadable": "totp",
}

_STORE_PROBLEMS: Final = frozenset(
    {"password_hash_unreadable", "totp_secret_unreadable"}
)
_LOGOUT_REASON: Final = "logout"


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """An authenticated engineer: who, with which role, on which session.

    ``created_at`` is the login time of the session: with the lifetime it gives
    the absolute end, which a long-lived WebSocket must not outlive.
    ``by_cookie`` says the request authenticated with the session cookie (which
    a browser attaches on its own, so state-changing requests then need
    ``csrf_token`` in a header); ``csrf_token`` is empty where no request
    brought the token (the revocation feed's view of a session).
    """

    username: str
    role: str
    token_hash: str
    created_at: datetime
    by_cookie: bool = False
    csrf_token: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginResult:
    """A successful login: the token (for the client only) and its absolute end."""

    token: str
    expires_at: datetime
    max_age_s: int


class LoginThrottled(Exception):
    """A login attempt must wait *wait_s* seconds (answer 429 + Retry-After)."""

    def __init__(self, wait_s: float) -> None:
        super().__init__("too many requests")
        self.wait_s = wait_s


class LoginService:
    """Engineer login and session checks, with their abuse limits.

    One per broker process; the limit tables live in memory (per node).

    Args:
        store: The relay store (called in worker threads).
        hasher: The shared password hasher.
        sealer: Opens the users' sealed TOTP secrets.
        config: Lifetimes and abuse limits.
        metrics: Where refusals are counted.
        log: Structured logger for audit events.
        wall_clock: The current time, timezone-aware (for TOTP and sessions).
        monotonic: Seconds on a monotonic clock (for the limit tables).
    """

    def __init__(
        self,
        *,
        store: Store,
        hasher: auth.PasswordHasher,
        sealer: auth.SecretSealer,
        config: EngineerAuthConfig,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], datetime],
        monotonic: Callable[[], float] = trio.current_time,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._sealer = sealer
        self._metrics = metrics
        self._log = log
        # Public for the app's error handlers, which count and log what they answer.
        self.metrics = metrics
        self.log = log
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        # Each argon2 hash takes 64 MiB: a login flood must not take the memory.
        self._hash_limiter = trio.CapacityLimiter(config.max_concurrent_password_hashes)
        self._totp_policy = totp_policy(config)
        self.lifetime: Final = auth.SessionLifetime(
            idle=timedelta(seconds=config.session_idle_s),
            absolute=timedelta(seconds=config.session_absolute_s),
        )
        self.rate_limiter: Final = auth.RateLimiter(
            auth.RateLimit(
                per_minute=config.unauthenticated_per_minute,
                burst=config.unauthenticated_burst,
            )
        )
        self.throttle: Final = auth.LoginThrottle(
            auth.LoginLimits(
                free_failures=config.login_free_failures,
                base_delay_s=config.login_base_delay_s,
                max_delay_s=config.login_max_delay_s,
                streak_ttl_s=max(auth.limits.HOUR_S, config.login_max_delay_s),
                max_failures_per_hour=config.login_failures_per_hour,
            )
        )

    # --- unauthenticated endpoints ---------------------------------------------

    def check_rate(self, source: str) -> None:
        """Take one request of *source*'s unauthenticated allowance.

        Raises:
            LoginThrottled: The address is over its rate.
        """
        wait = self.rate_limiter.check(source, now=self._monotonic())
        if wait > 0.0:
            self._metrics.auth_throttled.labels("rate_limit").inc()
            self._log.warning(
                "auth.rate_limited", source=source, wait_s=round(wait, 3), audit=True
            )
            raise LoginThrottled(wait)

    async def login(
        self, *, username: str, password: str, code: str, source: str
    ) -> LoginResult:
        """Check both factors and open a session.

        Raises:
            LoginThrottled: The (username, source) pair or the account must wait.
            auth.InvalidCredentials: Any failure; ``reason`` is for counters only.
        """
        logged_name = username[:MAX_LOGGED_USERNAME_CHARS]
        decision = self.throttle.decide(username, source, now=self._monotonic())
        if not decision.allowed:
            reason = decision.reason.value if decision.reason else "unknown"
            self._metrics.auth_throttled.labels(reason).inc()
            self._log.warning(
                "auth.login_throttled",
                username=logged_name,
                source=source,
                reason=reason,
                wait_s=round(decision.wait_s, 3),
                audit=True,
            )
            raise LoginThrottled(decision.wait_s)
        succeeded = False
        try:
            result = await self._login(username, password, code, source)
            succeeded = True
        except auth.InvalidCredentials as error:
            if error.reason in _STORE_PROBLEMS:
                # A broken row or the wrong sealing key: the operator must act.
                self._log.error(
                    "auth.credential_unreadable",
                    username=logged_name,
                    reason=error.reason,
                )
            self._metrics.auth_failures.labels(
                _FACTORS.get(error.reason, "user"), error.reason
            ).inc()
            self._log.warning(
                "auth.login_failed",
                username=logged_name,
                source=source,
                reason=error.reason,
                audit=True,
            )
            raise
        finally:
            # Settles the charge decide() made, on every way out (Rule of limits.py).
            if succeeded:
                self.throttle.record_success(username, source, now=self._monotonic())
            else:
                self.throttle.record_failure(username, source, now=self._monotonic())
        self._metrics.auth_logins.inc()
        self._log.info(
            "auth.login",
            username=username,
            source=source,
            token_hash=auth.token_hash(result.token)[:12],
            audit=True,
        )
        return result

    async def _login(
        self, username: str, password: str, code: str, source: str
    ) -> LoginResult:
        found = await trio.to_thread.run_sync(self._store.get_user, username)
        async with self._hash_limiter:
            user = await trio.to_thread.run_sync(self._check_password, found, password)
        if user.disabled_at is not None:
            raise auth.InvalidCredentials("user_disabled")
        try:
            secret = self._sealer.unseal(
                user.totp_secret_sealed, context=totp_context(username)
            )
            step = auth.verify_totp(
                secret,
                code,
                now=self._wall_clock(),
                last_accepted_step=user.totp_last_step,
                policy=self._totp_policy,
            )
        except (auth.SealedValueError, ValueError):
            raise auth.InvalidCredentials("totp_secret_unreadable") from None
        if not await trio.to_thread.run_sync(
            partial(
                self._store.accept_totp_step,
                username,
                step,
                totp_secret_sealed=user.totp_secret_sealed,
            )
        ):
            # Another login won the race for this step, or the user was disabled
            # or given a new secret since get_user().
            raise auth.InvalidCredentials("totp_reused")
        token = auth.new_token()
        now = self._wall_clock()
        try:
            await trio.to_thread.run_sync(
                partial(
                    self._store.create_login_session,
                    token_hash=auth.token_hash(token),
                    username=username,
                    at=now,
                    source=source,
                    totp_secret_sealed=user.totp_secret_sealed,
                )
            )
        except UserDisabled:
            raise auth.InvalidCredentials("user_disabled") from None
        except TotpSecretChanged:
            raise auth.InvalidCredentials("totp_reset") from None
        except UnknownUser:
            raise auth.InvalidCredentials("unknown_user") from None
        return LoginResult(
            token=token,
            expires_at=now + self.lifetime.absolute,
            max_age_s=int(self.lifetime.absolute.total_seconds()),
        )

    def _check_password(self, user: UserRecord | None, password: str) -> UserRecord:
        # Runs in a worker thread: one argon2 verification whatever the cause.
        if user is None:
            self._hasher.verify_unknown_user(password)
        try:
            self._hasher.verify(user.password_hash, password)
        except ValueError:
            raise auth.InvalidCredentials("password_hash_unreadable") from None
        return user

    # --- sessions ------------------------------------------------------------

    async def authenticate(self, request: HTTPConnection) -> Principal:
        """Find the live session of *request*'s bearer token or cookie.

        Raises:
            auth.InvalidToken: No token, or a malformed, unknown, revoked or
                expired one, or its user is disabled or gone.
        """
        try:
            return await self._authenticate(request)
        except auth.InvalidToken as error:
            self._metrics.auth_token_rejections.labels(error.reason).inc()
            raise

    async def _authenticate(self, request: HTTPConnection) -> Principal:
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                raise auth.InvalidToken("malformed")
            token = token.strip()
        else:
            cookie = request.cookies.get(SESSION_COOKIE)
            if cookie is None:
                raise auth.InvalidToken("missing")
            token = cookie
        digest = auth.token_hash(auth.verify_token_format(token))
        principal, _ends_at = await self._live_session(digest)
        await self.touch(digest)
        return dataclasses.replace(
            principal, by_cookie=header is None, csrf_token=auth.csrf_token(token)
        )

    async def _live_session(self, digest: str) -> tuple[Principal, datetime]:
        """The principal of the live session *digest* and when it will end.

        Raises:
            auth.InvalidToken: Unknown, revoked or expired, or the user is
                disabled or gone.
        """
        session = await trio.to_thread.run_sync(self._store.get_login_session, digest)
        if session is None:
            raise auth.InvalidToken("unknown")
        if session.revoked_at is not None:
            raise auth.InvalidToken("revoked")
        auth.verify_session_times(
            created_at=session.created_at,
            last_used_at=session.last_used_at,
            now=self._wall_clock(),
            lifetime=self.lifetime,
        )
        user = await trio.to_thread.run_sync(self._store.get_user, session.username)
        if user is None or user.disabled_at is not None:
            raise auth.InvalidToken("revoked")
        principal = Principal(
            username=user.username,
            role=user.role,
            token_hash=digest,
            created_at=session.created_at,
        )
        ends_at = auth.session_expiry(
            created_at=session.created_at,
            last_used_at=session.last_used_at,
            lifetime=self.lifetime,
        )
        return principal, ends_at

    async def session_end(self, token_hash: str) -> datetime:
        """When the live session *token_hash* ends (idle or absolute timeout).

        For WebSockets, which outlive the request that authenticated them: the
        session may have been used since (which moves the idle end), or ended.

        Raises:
            auth.InvalidToken: The session is over: revoked, expired, or its
                user disabled or gone.
        """
        _principal, ends_at = await self._live_session(token_hash)
        return ends_at

    async def touch(self, token_hash: str) -> None:
        """Mark the session *token_hash* as used now (against the idle timeout)."""
        await trio.to_thread.run_sync(
            partial(self._store.touch_login_session, token_hash, at=self._wall_clock())
        )

    async def logout(self, principal: Principal, *, source: str) -> None:
        """Revoke *principal*'s session at once."""
        await trio.to_thread.run_sync(
            partial(
                self._store.revoke_login_session,
                principal.token_hash,
                at=self._wall_clock(),
                reason=_LOGOUT_REASON,
            )
        )
        self._log.info(
            "auth.logout",
            username=principal.username,
            source=source,
            token_hash=principal.token_hash[:12],
            audit=True,
        )

    def csrf_refused(
        self, principal: Principal | None, route: tuple[str, str], reason: str
    ) -> None:
        """Count and audit a state-changing request refused as cross-site
        (*reason*: ``csrf`` for a missing or wrong token, ``bad_origin`` for an
        Origin outside the allow-list)."""
        self._metrics.engineer_refusals.labels(reason).inc()
        self._log.warning(
            "auth.csrf_refused",
            username=None if principal is None else principal.username,
            route=" ".join(route),
            reason=reason,
            audit=True,
        )

    def forbidden(self, principal: Principal, route: tuple[str, str]) -> None:
        """Count and audit a refusal by role."""
        self._metrics.auth_forbidden.inc()
        self._log.warning(
            "auth.forbidden",
            username=principal.username,
            role=principal.role,
            route=" ".join(route),
            audit=True,
        )

    async def list_devices(self, *, stale_after: timedelta) -> list[DeviceRecord]:
        """Every enrolled device with its presence."""
        return await trio.to_thread.run_sync(
            partial(
                self._store.list_devices,
                now=self._wall_clock(),
                stale_after=stale_after,
            )
        )
