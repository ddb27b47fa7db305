"""Abuse limits for unauthenticated endpoints and engineer logins (pure).

Two bounded tables: :class:`RateLimiter`, a token bucket per source address for every
unauthenticated endpoint, and :class:`LoginThrottle`, a progressive delay per
(account, source) plus an hourly failure cap per account for password/TOTP logins.
Nothing here reads a clock: ``now`` is seconds on a monotonic clock the caller owns,
and it must not go backwards between calls on one table.
"""

# Theory of operation
# ===================
# Rate limiter. Teleport limits unauthenticated endpoints to 20 requests a minute on
# average with a burst of 40 per source address, and so do we. A key's bucket holds
# up to ``burst`` tokens and gains ``per_minute / 60`` tokens a second; each request
# takes one, and a refused request is told how long until the next token (the shell
# answers 429 with ``Retry-After``, see :func:`retry_after_s`). A bucket is stored in
# GCRA form, as the one time at which it is full again, so no token count can drift
# and "full" is a single comparison.
#
# Login throttle. Teleport locks an account for 30 min after 5 failures (PCI DSS
# 8.3.4). A lock keyed on the account alone lets anyone who knows an engineer's name
# keep that engineer out for good by failing 5 times every half hour, and ASVS 5.0
# 6.1.1 asks us to say how malicious lockout is prevented. So there is no lock:
#
# - Per (account, source): after ``free_failures`` (5) consecutive failures, each
#   further attempt from that source for that account waits ``base_delay_s`` (1 s),
#   doubling with every further failure up to ``max_delay_s`` (1, 2, 4 ... 512, 900,
#   900 s). A success resets the pair; ``streak_ttl_s`` (1 h) without a failure
#   forgets it. The delay lands on the address that fails: the engineer logging in
#   from anywhere else is not slowed by it. One address gets 5 guesses, then about
#   4 an hour.
# - Per account, from all sources together: at most ``max_failures_per_hour`` (100)
#   failures in any sliding hour (ASVS 4.0.3 2.2.1). This is what stops an attacker
#   with many addresses, and it is the one place where an attacker can block the
#   victim: once 100 failures are in the window, every attempt for the account, from
#   any source and with the right password, is refused until the oldest of them is an
#   hour old. It lasts only while the attacker keeps failing (at most 100 times an
#   hour, each attempt also paying the per-source delay and the per-IP rate limit),
#   and it ends by itself at most an hour after the attacker stops; it never needs an
#   admin. Every refusal carries ``ThrottleReason.ACCOUNT_HOURLY_CAP``, which the shell
#   counts as a metric and writes as an audit event, so operators see it happen.
#
# An attempt is charged as a failure when decide() admits it, and record_success()
# refunds it. Charging at admission means parallel attempts cannot slip past the
# limits between the check and the (slow) password hash: 100 logins racing from 100
# addresses still meet the cap. An attempt that never settles (client gone, task
# cancelled) stays counted as a failure, which is the safe reading.
#
# Unknown user names are throttled exactly like real ones: the table keys on the
# submitted name and never learns whether the account exists, so watching which
# names get delayed tells an attacker nothing.
#
# Memory. Every table has a maximum entry count (65,536 by default, like OpenSSH's
# PerSourcePenalties). Entries are kept in least-recently-used order; before a new
# entry goes in, entries at the old end that carry no information any more (a full
# bucket, a forgotten streak, an account with no failure in the last hour) are
# dropped, and if the table is still full, the least recently used entry is evicted.
# An evicted key starts over: a full bucket, no streak, no hourly failures. Overflow
# is permissive, like OpenSSH's default; refusing every new key instead would let a
# flood of addresses or names lock everyone out. Filling a table costs an attacker one
# request per entry at 20 a minute per address. An account keeps at most
# ``max_failures_per_hour`` timestamps in an ``array('d')``: 88 bytes with one,
# 880 bytes with 100 (a deque allocates a 64-slot block, about 760 bytes, for one).
# Keys are stored as given, so the shell bounds their length (the login body limit).
#
# Rule 1: decide() and check() change nothing when they refuse, except dropping
#         expired entries and timestamps (bookkeeping).
# Rule 2: every insertion goes through _make_room(), so no table exceeds its maximum.

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeVar

__all__ = [
    "DEFAULT_LOGIN_LIMITS",
    "DEFAULT_MAX_KEYS",
    "HOUR_S",
    "UNAUTHENTICATED_RATE_LIMIT",
    "LoginLimits",
    "LoginThrottle",
    "RateLimit",
    "RateLimiter",
    "ThrottleDecision",
    "ThrottleReason",
    "TokenBucket",
    "retry_after_s",
]

HOUR_S: Final = 3600.0
DEFAULT_MAX_KEYS: Final = 65_536
# 2.0**62 seconds is far beyond any max_delay_s; the clamp only keeps the power small.
_MAX_EXPONENT: Final = 62

_K = TypeVar("_K")
_V = TypeVar("_V")


def _make_room(
    table: OrderedDict[_K, _V], max_entries: int, is_stale: Callable[[_V], bool]
) -> None:
    """Free one slot in an LRU-ordered *table* before an insertion (Rule 2)."""
    while table and is_stale(next(iter(table.values()))):
        table.popitem(last=False)
    if len(table) >= max_entries:
        table.popitem(last=False)


def _check_max_entries(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")


def retry_after_s(wait_s: float) -> int:
    """Whole seconds for a ``Retry-After`` header (RFC 9110 §10.2.3) from a wait.

    The wait is rounded to the microsecond first, so float noise such as
    ``2.0000000000000004`` does not add a second, and then rounded up. The result is
    at least 1, so a refused client is never told to retry at once.
    """
    return max(1, math.ceil(round(wait_s, 6)))


# --- Rate limiter -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """An average rate and a burst for one key's token bucket.

    Attributes:
        per_minute: Tokens added per minute (the long-run average rate).
        burst: Bucket size: how many requests a fresh or long-idle key may make at
            once.
    """

    per_minute: float
    burst: int

    def __post_init__(self) -> None:
        if not (0.0 < self.per_minute < math.inf):
            raise ValueError(f"per_minute must be positive, got {self.per_minute!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst!r}")

    @property
    def interval_s(self) -> float:
        """Seconds it takes to add one token."""
        return 60.0 / self.per_minute


# Teleport's LimiterAverage / LimiterBurst for unauthenticated endpoints, per source IP.
UNAUTHENTICATED_RATE_LIMIT: Final = RateLimit(per_minute=20.0, burst=40)


@dataclass(slots=True, kw_only=True)
class TokenBucket:
    """One key's token bucket, stored as the time it is full again (GCRA form).

    Attributes:
        limit: The rate and burst.
        full_at: When the bucket holds ``burst`` tokens again; ``-inf`` is a bucket
            that has always been full.
    """

    limit: RateLimit
    full_at: float = -math.inf

    def tokens(self, *, now: float) -> float:
        """How many tokens the bucket holds at *now* (between 0 and ``burst``)."""
        missing = max(0.0, self.full_at - now) / self.limit.interval_s
        return max(0.0, self.limit.burst - missing)

    def is_full(self, *, now: float) -> bool:
        """Whether the bucket is full at *now*, so forgetting it loses nothing."""
        return self.full_at <= now

    def check(self, *, now: float) -> float:
        """Take one token and return 0.0, or return the seconds until one is there.

        A refusal changes nothing: waiting the returned time is enough.
        """
        interval = self.limit.interval_s
        # At least one token at *now* <=> at most burst - 1 tokens missing.
        wait = self.full_at - (self.limit.burst - 1) * interval - now
        if wait > 0.0:
            return wait
        self.full_at = max(self.full_at, now) + interval
        return 0.0


class RateLimiter:
    """A token bucket per key (a source address), in a table of bounded size.

    When the table is full, the key idle longest is forgotten and starts again with
    a full bucket (permissive overflow, like OpenSSH's PerSourcePenalties); buckets
    that are full again are dropped first, since forgetting them changes nothing.

    Not checked here: what a key means. The shell decides which address counts as
    the source (the peer address, not a client-supplied header).
    """

    def __init__(
        self,
        limit: RateLimit = UNAUTHENTICATED_RATE_LIMIT,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        """Create an empty table.

        Args:
            limit: Rate and burst for every key.
            max_keys: Most keys tracked at once.

        Raises:
            ValueError: *max_keys* is below 1.
        """
        _check_max_entries("max_keys", max_keys)
        self._limit: Final = limit
        self._max_keys: Final = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def limit(self) -> RateLimit:
        """The rate and burst for every key."""
        return self._limit

    @property
    def max_keys(self) -> int:
        """Most keys tracked at once."""
        return self._max_keys

    @property
    def tracked_keys(self) -> int:
        """Keys in the table now (for a gauge)."""
        return len(self._buckets)

    def check(self, key: str, *, now: float) -> float:
        """Take a token from *key*'s bucket and return 0.0, or return the wait.

        Args:
            key: The source of the request, such as its IP address.
            now: Seconds on the caller's monotonic clock.

        Returns:
            0.0 when the request may go ahead (a token was taken); otherwise the
            seconds until the next token, for ``Retry-After`` via
            :func:`retry_after_s`. A refusal takes no token.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            _make_room(self._buckets, self._max_keys, lambda b: b.is_full(now=now))
            bucket = self._buckets[key] = TokenBucket(limit=self._limit)
        else:
            # A refused key is active too: keep it away from eviction.
            self._buckets.move_to_end(key)
        return bucket.check(now=now)


# --- Login throttle -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginLimits:
    """Progressive delay per (account, source) and an hourly cap per account.

    Attributes:
        free_failures: Consecutive failures from one source before delays start.
        base_delay_s: The first delay; each further failure doubles it.
        max_delay_s: The largest delay.
        streak_ttl_s: A pair with no failure for this long starts over.
        max_failures_per_hour: Failures per account in any sliding hour, all sources
            together; beyond it every attempt for the account is refused.
    """

    free_failures: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 15 * 60.0
    streak_ttl_s: float = HOUR_S
    max_failures_per_hour: int = 100

    def __post_init__(self) -> None:
        if self.free_failures < 0:
            raise ValueError(f"free_failures must be >= 0, got {self.free_failures!r}")
        if not (0.0 < self.base_delay_s <= self.max_delay_s < math.inf):
            raise ValueError("need 0 < base_delay_s <= max_delay_s < inf")
        # Otherwise a streak could be forgotten while its delay still runs.
        if not (self.max_delay_s <= self.streak_ttl_s < math.inf):
            raise ValueError("need max_delay_s <= streak_ttl_s < inf")
        if self.max_failures_per_hour < 1:
            raise ValueError(
                f"max_failures_per_hour must be >= 1, got {self.max_failures_per_hour!r}"
            )

    def delay_s(self, failures: int) -> float:
        """The wait owed after *failures* consecutive failures from one source.

        Example: with the defaults, 4 failures owe 0 s, 5 owe 1 s, 6 owe 2 s,
        14 owe 512 s and 15 or more owe 900 s.
        """
        if failures < self.free_failures:
            return 0.0
        exponent = min(failures - self.free_failures, _MAX_EXPONENT)
        return min(self.max_delay_s, self.base_delay_s * 2.0**exponent)


DEFAULT_LOGIN_LIMITS: Final = LoginLimits()


class ThrottleReason(Enum):
    """Why a login attempt must wait; the value is the metric label."""

    SOURCE_DELAY = "source_delay"
    ACCOUNT_HOURLY_CAP = "account_hourly_cap"


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrottleDecision:
    """The answer for one login attempt.

    Attributes:
        wait_s: 0.0 when the attempt may go ahead, else seconds to wait.
        reason: Why it must wait; ``None`` when it may go ahead.
    """

    wait_s: float
    reason: ThrottleReason | None

    @property
    def allowed(self) -> bool:
        """Whether the attempt may go ahead now."""
        return self.reason is None


_ALLOWED: Final = ThrottleDecision(wait_s=0.0, reason=None)


@dataclass(slots=True)
class _Streak:
    """Consecutive failures of one (account, source) pair, and the latest one's time."""

    failures: int
    last_at: float


class LoginThrottle:
    """Progressive delay per (account, source) and an hourly cap per account.

    See the theory of operation at the top of this module. The shell calls, for each
    login attempt (password and TOTP together)::

        decision = throttle.decide(name, peer_ip, now=now)
        if not decision.allowed:
            ...  # 429, Retry-After: retry_after_s(decision.wait_s); count the reason
        # verify; then exactly one of:
        throttle.record_success(name, peer_ip, now=now)
        throttle.record_failure(name, peer_ip, now=now)  # also on any error

    Not checked here: whether the account exists (unknown names are throttled the
    same way on purpose), and name normalisation. Pass the name normalised the way
    the user store looks it up, or ``Alice`` and ``alice`` get two throttles for one
    account.
    """

    def __init__(
        self,
        limits: LoginLimits = DEFAULT_LOGIN_LIMITS,
        *,
        max_accounts: int = DEFAULT_MAX_KEYS,
        max_pairs: int = DEFAULT_MAX_KEYS,
    ) -> None:
        """Create empty tables.

        Args:
            limits: The delays and the hourly cap.
            max_accounts: Most account names tracked for the hourly cap.
            max_pairs: Most (account, source) streaks tracked.

        Raises:
            ValueError: *max_accounts* or *max_pairs* is below 1.
        """
        _check_max_entries("max_accounts", max_accounts)
        _check_max_entries("max_pairs", max_pairs)
        self._limits: Final = limits
        self._max_accounts: Final = max_accounts
        self._max_pairs: Final = max_pairs
        self._streaks: OrderedDict[tuple[str, str], _Streak] = OrderedDict()
        # Charged failure times per account, ascending, only the last hour's kept.
        self._failures: OrderedDict[str, array[float]] = OrderedDict()

    @property
    def limits(self) -> LoginLimits:
        """The delays and the hourly cap."""
        return self._limits

    @property
    def tracked_accounts(self) -> int:
        """Account names in the hourly table now (for a gauge)."""
        return len(self._failures)

    @property
    def tracked_pairs(self) -> int:
        """(account, source) streaks in the table now (for a gauge)."""
        return len(self._streaks)

    def decide(self, account: str, source: str, *, now: float) -> ThrottleDecision:
        """Decide whether a login attempt may go ahead, and charge it if it may.

        An admitted attempt counts as a failure until :meth:`record_success` refunds
        it. When both limits apply, the longer wait is returned, with its reason.

        Args:
            account: The submitted user name, whether or not such a user exists.
            source: The attempt's source address.
            now: Seconds on the caller's monotonic clock.
        """
        pair = (account, source)
        streak = self._live_streak(pair, now=now)
        source_wait = 0.0
        if streak is not None:
            source_wait = streak.last_at + self._limits.delay_s(streak.failures) - now
        times = self._live_failures(account, now=now)
        account_wait = 0.0
        cap = self._limits.max_failures_per_hour
        if times is not None and len(times) >= cap:
            # The window drops below the cap when this failure is an hour old.
            account_wait = times[len(times) - cap] + HOUR_S - now
        if account_wait > 0.0 and account_wait >= source_wait:
            return ThrottleDecision(
                wait_s=account_wait, reason=ThrottleReason.ACCOUNT_HOURLY_CAP
            )
        if source_wait > 0.0:
            return ThrottleDecision(
                wait_s=source_wait, reason=ThrottleReason.SOURCE_DELAY
            )
        self._charge(pair, streak, times, now=now)
        return _ALLOWED

    def check(self, account: str, source: str, *, now: float) -> float:
        """Like :meth:`decide`, returning only the wait (0.0: go ahead, charged)."""
        return self.decide(account, source, now=now).wait_s

    def record_failure(self, account: str, source: str, *, now: float) -> None:
        """Settle an admitted attempt as failed; the pair's delay runs from *now*.

        The failure was already counted when :meth:`decide` admitted it. If the pair
        is not on record (the caller skipped :meth:`decide`, or the entry was
        evicted meanwhile), the failure is charged now.
        """
        pair = (account, source)
        streak = self._live_streak(pair, now=now)
        if streak is None:
            self._charge(pair, None, self._live_failures(account, now=now), now=now)
        else:
            streak.last_at = now
            self._streaks.move_to_end(pair)

    def record_success(self, account: str, source: str, *, now: float) -> None:
        """Settle an admitted attempt as successful: reset the pair, refund the charge.

        Earlier failures of the account stay in its hourly window. With attempts in
        flight in parallel, the refund removes the newest charge, which may be another
        attempt's; the count is the same and the times differ by one verification.
        """
        self._streaks.pop((account, source), None)
        times = self._live_failures(account, now=now)
        if times:
            times.pop()

    def _live_streak(self, pair: tuple[str, str], *, now: float) -> _Streak | None:
        """The pair's streak, or ``None`` if it has none or has forgotten it."""
        streak = self._streaks.get(pair)
        if streak is not None and now - streak.last_at >= self._limits.streak_ttl_s:
            del self._streaks[pair]
            return None
        return streak

    def _live_failures(self, account: str, *, now: float) -> array[float] | None:
        """The account's failure times in the last hour (pruned in place), if tracked."""
        times = self._failures.get(account)
        if times is not None:
            # The window is (now - 1 h, now]: a failure exactly an hour old is out.
            del times[: bisect_right(times, now - HOUR_S)]
        return times

    def _charge(
        self,
        pair: tuple[str, str],
        streak: _Streak | None,
        times: array[float] | None,
        *,
        now: float,
    ) -> None:
        """Count one failure for *pair* and its account."""
        ttl = self._limits.streak_ttl_s
        if streak is None:
            _make_room(self._streaks, self._max_pairs, lambda s: now - s.last_at >= ttl)
            self._streaks[pair] = _Streak(1, now)
        else:
            streak.failures += 1
            streak.last_at = now
            self._streaks.move_to_end(pair)
        account = pair[0]
        if times is None:
            _make_room(
                self._failures,
                self._max_accounts,
                lambda t: not t or t[-1] <= now - HOUR_S,
            )
            self._failures[account] = array("d", [now])
        else:
            times.append(now)
            # Only a failure charged without admission can pass the cap; the oldest
            # beyond it can never matter again, so the array stays bounded.
            excess = len(times) - self._limits.max_failures_per_hour
            if excess > 0:
                del times[:excess]
            self._failures.move_to_end(account)
