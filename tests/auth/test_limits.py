"""Tests for auth.limits: the per-source rate limiter and the login throttle."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from auth.limits import (
    DEFAULT_LOGIN_LIMITS,
    DEFAULT_MAX_KEYS,
    HOUR_S,
    UNAUTHENTICATED_RATE_LIMIT,
    LoginLimits,
    LoginThrottle,
    RateLimit,
    RateLimiter,
    ThrottleDecision,
    ThrottleReason,
    TokenBucket,
    retry_after_s,
)

ALICE = "alice"
HOME = "198.51.100.7"
ATTACKER = "203.0.113.66"


def fail(throttle: LoginThrottle, account: str, source: str, *, now: float) -> None:
    """One admitted attempt that fails (the test asserts it was admitted)."""
    assert throttle.check(account, source, now=now) == 0.0
    throttle.record_failure(account, source, now=now)


def fail_next(
    throttle: LoginThrottle, account: str, source: str, *, now: float
) -> float:
    """Wait out any delay, then fail one attempt; return the time of the failure."""
    decision = throttle.decide(account, source, now=now)  # charges if allowed
    if not decision.allowed:
        now += decision.wait_s
        assert throttle.check(account, source, now=now) == 0.0
    throttle.record_failure(account, source, now=now)
    return now


# --- Rate limiter: the numbers --------------------------------------------------------


def test_unauthenticated_defaults_are_20_per_minute_burst_40() -> None:
    """The default limit is Teleport's 20/min average, burst 40, over 65,536 sources."""
    limiter = RateLimiter()
    assert limiter.limit == UNAUTHENTICATED_RATE_LIMIT
    assert (limiter.limit.per_minute, limiter.limit.burst) == (20.0, 40)
    assert limiter.limit.interval_s == 3.0
    assert limiter.max_keys == DEFAULT_MAX_KEYS == 65_536


def test_burst_of_40_then_retry_after_3_s() -> None:
    """A new source gets 40 requests at once; the 41st is told to wait 3 s."""
    limiter = RateLimiter()
    assert [limiter.check(HOME, now=0.0) for _ in range(40)] == [0.0] * 40
    wait = limiter.check(HOME, now=0.0)
    assert wait == 3.0
    assert retry_after_s(wait) == 3


def test_refill_is_one_token_every_3_s() -> None:
    """After the burst, one request every 3 s goes through: 20 a minute."""
    limiter = RateLimiter()
    for _ in range(40):
        limiter.check(HOME, now=0.0)
    allowed = 0
    for tenth in range(1, 600):  # one minute, in steps of 0.1 s
        if limiter.check(HOME, now=tenth / 10) == 0.0:
            allowed += 1
    assert allowed == 19  # at 3, 6, ... 57 s; the 20th token arrives at 60 s
    assert limiter.check(HOME, now=60.0) == 0.0


@pytest.mark.parametrize(
    ("now", "wait", "header"),
    [
        (0.0, 3.0, 3),
        (1.0, 2.0, 2),
        (2.5, 0.5, 1),
        (2.999, 0.001, 1),
    ],
)
def test_retry_after_values_after_the_burst(
    now: float, wait: float, header: int
) -> None:
    """The wait counts down to the next token; Retry-After is its ceiling."""
    limiter = RateLimiter()
    for _ in range(40):
        limiter.check(HOME, now=0.0)
    got = limiter.check(HOME, now=now)
    assert got == pytest.approx(wait)
    assert retry_after_s(got) == header


@pytest.mark.parametrize(
    ("wait", "header"),
    [(0.0, 1), (0.001, 1), (1.0, 1), (2.0000000000000004, 2), (2.5, 3), (900.0, 900)],
)
def test_retry_after_rounds_up_ignoring_float_noise(wait: float, header: int) -> None:
    """Retry-After is the wait rounded up, at least 1, and float noise adds nothing."""
    assert retry_after_s(wait) == header


def test_refused_request_takes_no_token() -> None:
    """Hammering while refused does not push the next token further away."""
    limiter = RateLimiter()
    for _ in range(40):
        limiter.check(HOME, now=0.0)
    for _ in range(100):
        assert limiter.check(HOME, now=1.0) == 2.0
    assert limiter.check(HOME, now=3.0) == 0.0


def test_long_idle_refills_only_to_the_burst() -> None:
    """A source idle for an hour gets 40 requests, not 40 + 1200."""
    limiter = RateLimiter()
    limiter.check(HOME, now=0.0)
    allowed = [limiter.check(HOME, now=HOUR_S) == 0.0 for _ in range(50)]
    assert allowed.count(True) == 40


def test_sources_are_limited_independently() -> None:
    """One source using up its burst leaves another source's bucket full."""
    limiter = RateLimiter()
    for _ in range(41):
        limiter.check(ATTACKER, now=0.0)
    assert limiter.check(ATTACKER, now=0.0) > 0.0
    assert limiter.check(HOME, now=0.0) == 0.0


def test_token_bucket_reports_its_level() -> None:
    """A bucket starts full, empties by one per request and refills at the rate."""
    bucket = TokenBucket(limit=RateLimit(per_minute=60.0, burst=3))
    assert bucket.tokens(now=0.0) == 3.0
    assert bucket.is_full(now=0.0)
    bucket.check(now=0.0)
    bucket.check(now=0.0)
    assert bucket.tokens(now=0.0) == 1.0
    assert bucket.tokens(now=0.5) == 1.5
    assert not bucket.is_full(now=1.5)
    assert bucket.is_full(now=2.0)
    assert bucket.tokens(now=100.0) == 3.0


# --- Rate limiter: bounded memory -------------------------------------------------------


def test_full_buckets_are_dropped_before_a_new_key_goes_in() -> None:
    """Buckets that refilled carry no state, so they leave the table first."""
    limiter = RateLimiter(RateLimit(per_minute=60.0, burst=2), max_keys=10)
    for n in range(5):
        limiter.check(f"10.0.0.{n}", now=0.0)  # one token used: full again at 1 s
    assert limiter.tracked_keys == 5
    limiter.check("10.0.0.99", now=1.0)
    assert limiter.tracked_keys == 1


def test_full_table_evicts_the_idle_longest_key_which_starts_full() -> None:
    """At max_keys, the least recently seen key is forgotten; it restarts with a full bucket."""
    limiter = RateLimiter(RateLimit(per_minute=1.0, burst=1), max_keys=2)
    assert limiter.check("a", now=0.0) == 0.0
    assert limiter.check("b", now=1.0) == 0.0
    assert limiter.check("a", now=2.0) > 0.0  # refused, but seen: "b" is now oldest
    assert limiter.check("c", now=3.0) == 0.0  # evicts "b"
    assert limiter.tracked_keys == 2
    assert limiter.check("a", now=4.0) > 0.0  # "a" kept its empty bucket
    # Permissive overflow: "b" was forgotten, so it gets a full bucket again.
    assert limiter.check("b", now=5.0) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_minute": 0.0, "burst": 1},
        {"per_minute": -1.0, "burst": 1},
        {"per_minute": float("inf"), "burst": 1},
        {"per_minute": float("nan"), "burst": 1},
        {"per_minute": 20.0, "burst": 0},
    ],
)
def test_rate_limit_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    """A rate that is not positive and finite, or a burst below 1, is refused."""
    with pytest.raises(ValueError, match="must be"):
        RateLimit(**kwargs)


def test_rate_limiter_needs_room_for_one_key() -> None:
    """max_keys below 1 is refused."""
    with pytest.raises(ValueError, match="max_keys"):
        RateLimiter(max_keys=0)


# --- Rate limiter: invariants -------------------------------------------------------------

_OPS = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=150
)


@given(_OPS)
def test_a_key_never_gets_more_than_burst_plus_rate_times_elapsed(
    ops: list[tuple[int, int]],
) -> None:
    """Between any two granted requests of a key, grants <= burst + rate * elapsed."""
    limit = RateLimit(per_minute=20.0, burst=4)
    limiter = RateLimiter(limit)
    granted: dict[int, list[float]] = {}
    now = 0.0
    for step, key in ops:
        now += step
        if limiter.check(str(key), now=now) == 0.0:
            granted.setdefault(key, []).append(now)
    for times in granted.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                allowance = limit.burst + (times[j] - start) / limit.interval_s
                assert j - i + 1 <= allowance + 1e-9


@given(_OPS)
def test_rate_wait_is_never_negative_and_always_enough(
    ops: list[tuple[int, int]],
) -> None:
    """A wait is >= 0, and a key that waits exactly that long is served."""
    limiter = RateLimiter(RateLimit(per_minute=20.0, burst=2))
    now = 0.0
    for step, key in ops:
        now += step
        wait = limiter.check(str(key), now=now)
        assert wait >= 0.0
        if wait > 0.0:
            later = copy.deepcopy(limiter)
            assert later.check(str(key), now=now + wait) == 0.0


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50)), max_size=200))
def test_rate_memory_stays_within_max_keys(ops: list[tuple[int, int]]) -> None:
    """However many sources appear, the table never holds more than max_keys."""
    limiter = RateLimiter(RateLimit(per_minute=6.0, burst=2), max_keys=8)
    now = 0.0
    for step, key in ops:
        now += step
        limiter.check(str(key), now=now)
        assert limiter.tracked_keys <= 8


# --- Login throttle: progressive delay per (account, source) ---------------------------


def test_login_defaults() -> None:
    """Defaults: 5 free failures, 1 s doubling to 900 s, forgotten after 1 h, 100/h cap."""
    limits = DEFAULT_LOGIN_LIMITS
    assert (limits.free_failures, limits.base_delay_s, limits.max_delay_s) == (
        5,
        1.0,
        900.0,
    )
    assert (limits.streak_ttl_s, limits.max_failures_per_hour) == (3600.0, 100)
    assert LoginThrottle().limits == limits


def test_five_free_failures_then_delays_double_up_to_900_s() -> None:
    """After 5 failures from a source, each attempt waits 1, 2, 4 ... 512, then 900 s."""
    throttle = LoginThrottle()
    now = 0.0
    for _ in range(5):
        fail(throttle, ALICE, ATTACKER, now=now)
    waits = []
    for _ in range(12):
        decision = throttle.decide(ALICE, ATTACKER, now=now)
        assert decision.reason is ThrottleReason.SOURCE_DELAY
        waits.append(decision.wait_s)
        now += decision.wait_s
        fail(throttle, ALICE, ATTACKER, now=now)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900]


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 0.0), (4, 0.0), (5, 1.0), (6, 2.0), (14, 512.0), (15, 900.0), (10**6, 900.0)],
)
def test_delay_table(failures: int, delay: float) -> None:
    """delay_s maps consecutive failures to the wait owed, capped at 900 s."""
    assert DEFAULT_LOGIN_LIMITS.delay_s(failures) == delay


def test_delay_runs_from_the_failure_not_the_admission() -> None:
    """A slow verification does not eat into the delay: it starts when the failure is known."""
    throttle = LoginThrottle()
    for n in range(5):  # each verification takes 10 s
        assert throttle.check(ALICE, ATTACKER, now=10.0 * n) == 0.0
        throttle.record_failure(ALICE, ATTACKER, now=10.0 * n + 10.0)
    # Admitted at 40 s, failed at 50 s: the 1 s delay ends at 51 s.
    assert throttle.check(ALICE, ATTACKER, now=50.0) == 1.0


def test_attempt_during_the_delay_is_refused_without_growing_it() -> None:
    """A refused attempt is not charged: the wait simply counts down."""
    throttle = LoginThrottle()
    for _ in range(5):
        fail(throttle, ALICE, ATTACKER, now=0.0)
    for _ in range(50):
        assert throttle.check(ALICE, ATTACKER, now=0.25) == 0.75
    assert throttle.check(ALICE, ATTACKER, now=1.0) == 0.0


def test_success_resets_the_pair() -> None:
    """After a success, the source has 5 free failures again."""
    throttle = LoginThrottle()
    for _ in range(5):
        fail(throttle, ALICE, HOME, now=0.0)
    assert throttle.check(ALICE, HOME, now=1.0) == 0.0
    throttle.record_success(ALICE, HOME, now=1.0)
    assert throttle.tracked_pairs == 0
    for _ in range(5):
        fail(throttle, ALICE, HOME, now=2.0)
    assert throttle.check(ALICE, HOME, now=2.0) == 1.0


def test_other_source_for_the_same_account_is_not_delayed() -> None:
    """An attacker's delay at their address does not slow the victim elsewhere."""
    throttle = LoginThrottle()
    now = 0.0
    for _ in range(15):
        now = fail_next(throttle, ALICE, ATTACKER, now=now)
    assert throttle.check(ALICE, ATTACKER, now=now) == 900.0
    assert throttle.decide(ALICE, HOME, now=now) == ThrottleDecision(
        wait_s=0.0, reason=None
    )


def test_quiet_streak_is_forgotten_after_its_ttl() -> None:
    """A pair with no failure for streak_ttl_s (1 h) starts over with 5 free failures."""
    throttle = LoginThrottle()
    for _ in range(5):
        fail(throttle, ALICE, ATTACKER, now=0.0)
    assert throttle.check(ALICE, ATTACKER, now=HOUR_S - 1) == 0.0
    throttle.record_failure(ALICE, ATTACKER, now=HOUR_S - 1)
    assert throttle.check(ALICE, ATTACKER, now=2 * HOUR_S - 1) == 0.0  # forgotten
    throttle.record_failure(ALICE, ATTACKER, now=2 * HOUR_S - 1)
    for _ in range(4):
        fail(throttle, ALICE, ATTACKER, now=2 * HOUR_S)
    assert throttle.check(ALICE, ATTACKER, now=2 * HOUR_S) == 1.0


# --- Login throttle: the hourly cap per account ------------------------------------------


def test_101st_failure_in_an_hour_is_refused_from_every_source() -> None:
    """100 failures in an hour refuse every source until the oldest is an hour old."""
    throttle = LoginThrottle()
    for n in range(100):  # one failure from each of 100 addresses, one a second
        fail(throttle, ALICE, f"10.1.0.{n}", now=float(n))
    for source in (HOME, ATTACKER, "10.1.0.0"):
        decision = throttle.decide(ALICE, source, now=100.0)
        assert decision.reason is ThrottleReason.ACCOUNT_HOURLY_CAP
        assert decision.wait_s == HOUR_S - 100.0  # oldest failure (t=0) + 1 h
    assert throttle.check(ALICE, HOME, now=HOUR_S - 0.5) == 0.5
    assert throttle.check(ALICE, HOME, now=HOUR_S) == 0.0  # t=0 is out of the window
    throttle.record_success(ALICE, HOME, now=HOUR_S)
    # The window slides: the next slot frees when the t=1 failure is an hour old.
    fail(throttle, ALICE, ATTACKER, now=HOUR_S)
    assert throttle.check(ALICE, HOME, now=HOUR_S) == 1.0
    assert throttle.check("bob", HOME, now=HOUR_S) == 0.0  # other accounts unaffected


def test_success_is_refunded_from_the_hourly_count() -> None:
    """A successful login does not count towards the 100 failures."""
    throttle = LoginThrottle(LoginLimits(max_failures_per_hour=2))
    for _ in range(10):
        assert throttle.check(ALICE, HOME, now=0.0) == 0.0
        throttle.record_success(ALICE, HOME, now=0.0)
    fail(throttle, ALICE, HOME, now=0.0)
    fail(throttle, ALICE, HOME, now=0.0)
    assert throttle.decide(ALICE, HOME, now=0.0).reason is (
        ThrottleReason.ACCOUNT_HOURLY_CAP
    )


def test_parallel_attempts_are_charged_when_admitted() -> None:
    """Attempts racing past decide() before any failure is recorded still meet both limits."""
    throttle = LoginThrottle()
    for _ in range(5):
        assert throttle.check(ALICE, ATTACKER, now=0.0) == 0.0
    assert throttle.check(ALICE, ATTACKER, now=0.0) == 1.0  # the 6th waits
    for n in range(95):
        assert throttle.check(ALICE, f"10.2.0.{n}", now=0.0) == 0.0
    assert throttle.decide(ALICE, HOME, now=0.0).reason is (
        ThrottleReason.ACCOUNT_HOURLY_CAP
    )


def test_attempt_never_settled_counts_as_a_failure() -> None:
    """An admitted attempt that is never settled (client gone) stays a failure."""
    throttle = LoginThrottle(LoginLimits(free_failures=1, max_failures_per_hour=1))
    assert throttle.check(ALICE, ATTACKER, now=0.0) == 0.0
    assert throttle.decide(ALICE, HOME, now=10.0) == ThrottleDecision(
        wait_s=HOUR_S - 10.0, reason=ThrottleReason.ACCOUNT_HOURLY_CAP
    )


@pytest.mark.parametrize(
    ("hour_offset", "reason", "wait"),
    [
        (5.0, ThrottleReason.SOURCE_DELAY, 50.0),  # cap frees in 5 s, delay is 50 s
        (60.0, ThrottleReason.ACCOUNT_HOURLY_CAP, 60.0),  # cap frees in 60 s
        (50.0, ThrottleReason.ACCOUNT_HOURLY_CAP, 50.0),  # a tie names the cap
    ],
)
def test_the_longer_wait_wins_and_names_its_reason(
    hour_offset: float, reason: ThrottleReason, wait: float
) -> None:
    """When both limits apply, the decision is the longer wait, with its reason."""
    limits = LoginLimits(
        free_failures=0,
        base_delay_s=50.0,
        max_delay_s=50.0,
        max_failures_per_hour=2,
    )
    throttle = LoginThrottle(limits)
    now = HOUR_S - hour_offset
    fail(throttle, ALICE, HOME, now=0.0)  # oldest failure: frees the cap at 1 h
    fail(throttle, ALICE, ATTACKER, now=now)  # the attacker now owes 50 s
    assert throttle.decide(ALICE, ATTACKER, now=now) == ThrottleDecision(
        wait_s=wait, reason=reason
    )


# --- Login throttle: settling without admission, and unknown names -------------------------


def test_failure_without_admission_is_charged() -> None:
    """record_failure for a pair not on record counts the failure now."""
    throttle = LoginThrottle(LoginLimits(free_failures=1, max_failures_per_hour=2))
    throttle.record_failure(ALICE, ATTACKER, now=0.0)
    assert throttle.check(ALICE, ATTACKER, now=0.0) == 1.0
    throttle.record_failure(ALICE, HOME, now=0.0)
    assert throttle.decide(ALICE, "192.0.2.1", now=0.0).reason is (
        ThrottleReason.ACCOUNT_HOURLY_CAP
    )


def test_unadmitted_failures_never_grow_an_account_past_the_cap() -> None:
    """Even failures charged without admission keep at most the cap's timestamps."""
    throttle = LoginThrottle(LoginLimits(max_failures_per_hour=3))
    for n in range(10):
        throttle.record_failure(ALICE, f"10.3.0.{n}", now=float(n))
    # Only the last 3 (t=7, 8, 9) are kept: the cap frees when t=7 is an hour old.
    assert throttle.check(ALICE, HOME, now=10.0) == HOUR_S + 7.0 - 10.0


def test_success_with_nothing_on_record_changes_nothing() -> None:
    """record_success for an unknown pair or account is harmless."""
    throttle = LoginThrottle()
    throttle.record_success(ALICE, HOME, now=0.0)
    assert (throttle.tracked_pairs, throttle.tracked_accounts) == (0, 0)
    fail(throttle, ALICE, HOME, now=0.0)
    throttle.record_success(ALICE, HOME, now=HOUR_S)  # the charge already expired
    assert throttle.check(ALICE, HOME, now=HOUR_S) == 0.0


@pytest.mark.parametrize("account", ["alice", "no-such-engineer", "ALICE", ""])
def test_unknown_user_names_are_throttled_like_real_ones(account: str) -> None:
    """Any submitted name, real or not, gets the same delays and the same cap."""
    throttle = LoginThrottle(LoginLimits(max_failures_per_hour=8))
    decisions = []
    for step in range(20):
        decision = throttle.decide(account, ATTACKER, now=float(step))
        decisions.append(decision)
        if decision.allowed:
            throttle.record_failure(account, ATTACKER, now=float(step))
    reference = LoginThrottle(LoginLimits(max_failures_per_hour=8))
    expected = []
    for step in range(20):
        decision = reference.decide("alice", ATTACKER, now=float(step))
        expected.append(decision)
        if decision.allowed:
            reference.record_failure("alice", ATTACKER, now=float(step))
    assert decisions == expected
    # Attempts at t = 0..5, 7 and 11 go through (delays 1, 2, 4 s from t = 4), then
    # the 8 failures reach this test's hourly cap.
    assert [d.allowed for d in decisions[:12]] == [True] * 6 + [False, True] + [
        False
    ] * 3 + [True]
    assert decisions[-1].reason is ThrottleReason.ACCOUNT_HOURLY_CAP


# --- Login throttle: bounded memory ------------------------------------------------------


def test_full_pair_table_drops_forgotten_streaks_then_evicts_the_oldest() -> None:
    """At max_pairs, forgotten streaks go first, then the least recently failing pair."""
    throttle = LoginThrottle(max_pairs=2)
    fail(throttle, ALICE, "a", now=0.0)
    fail(throttle, ALICE, "b", now=HOUR_S - 10)
    fail(throttle, ALICE, "c", now=HOUR_S)  # "a" is an hour old: dropped, no eviction
    assert throttle.tracked_pairs == 2
    for _ in range(4):
        fail(throttle, ALICE, "b", now=HOUR_S)  # "b": 5 failures, owes 1 s
    fail(throttle, ALICE, "d", now=HOUR_S)  # evicts "c", the least recent
    assert throttle.tracked_pairs == 2
    assert throttle.check(ALICE, "b", now=HOUR_S) == 1.0  # "b" kept its streak
    fail(throttle, ALICE, "e", now=HOUR_S)  # evicts "b", now the least recent
    # Permissive overflow: "b" was forgotten and has free failures again.
    assert throttle.check(ALICE, "b", now=HOUR_S) == 0.0


def test_full_account_table_drops_expired_accounts_then_evicts_the_oldest() -> None:
    """At max_accounts, accounts with no failure in the last hour go first, then the oldest."""
    limits = LoginLimits(max_failures_per_hour=1)
    throttle = LoginThrottle(limits, max_accounts=2)
    fail(throttle, "old", HOME, now=0.0)
    fail(throttle, "bob", HOME, now=10.0)
    fail(throttle, "carol", HOME, now=HOUR_S)  # "old" expired: dropped
    assert throttle.tracked_accounts == 2
    assert throttle.decide("bob", ATTACKER, now=HOUR_S).reason is (
        ThrottleReason.ACCOUNT_HOURLY_CAP
    )
    fail(throttle, "dave", HOME, now=HOUR_S)  # evicts "bob", the oldest
    assert throttle.tracked_accounts == 2
    assert throttle.check("bob", ATTACKER, now=HOUR_S) == 0.0  # forgotten: permissive


def test_refunded_account_is_dropped_first_when_room_is_needed() -> None:
    """An account whose only charge was refunded carries nothing and leaves first."""
    throttle = LoginThrottle(max_accounts=1)
    assert throttle.check(ALICE, HOME, now=0.0) == 0.0
    throttle.record_success(ALICE, HOME, now=0.0)
    assert throttle.tracked_accounts == 1
    fail(throttle, "bob", HOME, now=1.0)
    assert throttle.tracked_accounts == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"free_failures": -1},
        {"base_delay_s": 0.0},
        {"base_delay_s": 10.0, "max_delay_s": 5.0},
        {"max_delay_s": float("inf")},
        {"base_delay_s": float("nan")},
        {"streak_ttl_s": 60.0},
        {"streak_ttl_s": float("inf")},
        {"max_failures_per_hour": 0},
    ],
)
def test_login_limits_reject_nonsense(kwargs: dict[str, Any]) -> None:
    """Negative counts, empty or unbounded delays and a TTL shorter than the delay are refused."""
    with pytest.raises(ValueError, match=r"must be|need"):
        LoginLimits(**kwargs)


@pytest.mark.parametrize(
    ("make", "table"),
    [
        (lambda: LoginThrottle(max_accounts=0), "max_accounts"),
        (lambda: LoginThrottle(max_pairs=0), "max_pairs"),
    ],
)
def test_login_throttle_needs_room_for_one_entry(
    make: Callable[[], LoginThrottle], table: str
) -> None:
    """max_accounts or max_pairs below 1 is refused."""
    with pytest.raises(ValueError, match=table):
        make()


# --- Login throttle: invariants ------------------------------------------------------------

_LOGIN_LIMITS = LoginLimits(
    free_failures=2,
    base_delay_s=10.0,
    max_delay_s=200.0,
    streak_ttl_s=600.0,
    max_failures_per_hour=6,
)
_LOGIN_OPS = st.lists(
    st.tuples(
        st.integers(0, 400),  # seconds since the previous attempt
        st.integers(0, 2),  # account
        st.integers(0, 3),  # source
        st.booleans(),  # whether the attempt, if admitted, succeeds
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=200)
@given(_LOGIN_OPS)
def test_login_invariants(ops: list[tuple[int, int, int, bool]]) -> None:
    """Waits are >= 0 and enough, refusals name a reason, and tables stay bounded."""
    throttle = LoginThrottle(_LOGIN_LIMITS, max_accounts=2, max_pairs=5)
    now = 0.0
    for step, account_n, source_n, succeeds in ops:
        now += step
        account, source = f"user{account_n}", f"10.0.0.{source_n}"
        decision = throttle.decide(account, source, now=now)
        assert decision.wait_s >= 0.0
        assert decision.allowed == (decision.wait_s == 0.0)
        assert decision.allowed == (decision.reason is None)
        if not decision.allowed:
            later = copy.deepcopy(throttle)
            assert later.check(account, source, now=now + decision.wait_s) == 0.0
            continue
        if succeeds:
            throttle.record_success(account, source, now=now)
        else:
            throttle.record_failure(account, source, now=now)
        assert throttle.tracked_accounts <= 2
        assert throttle.tracked_pairs <= 5


@given(_LOGIN_OPS)
def test_hourly_cap_holds_without_eviction(
    ops: list[tuple[int, int, int, bool]],
) -> None:
    """With room for every account, no sliding hour ever holds more than the cap's failures."""
    throttle = LoginThrottle(_LOGIN_LIMITS)
    failures: dict[int, list[float]] = {}
    now = 0.0
    for step, account_n, source_n, succeeds in ops:
        now += step
        account, source = f"user{account_n}", f"10.0.0.{source_n}"
        if not throttle.decide(account, source, now=now).allowed:
            continue
        if succeeds:
            throttle.record_success(account, source, now=now)
            continue
        throttle.record_failure(account, source, now=now)
        times = failures.setdefault(account_n, [])
        times.append(now)
        assert (
            sum(t > now - HOUR_S for t in times) <= _LOGIN_LIMITS.max_failures_per_hour
        )
