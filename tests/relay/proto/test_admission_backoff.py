"""Admission control and agent backoff: pure decisions, table-tested."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from relay.proto.admission import Admission, AdmissionLimits, admit
from relay.proto.backoff import Backoff, Outcome, plan_retry

LIMITS = AdmissionLimits(early_drop=32, hard_cap=64, per_source=10)


@pytest.mark.parametrize(
    ("pending", "from_source", "draw", "expected"),
    [
        (0, 0, 0.0, Admission.ADMIT),
        (31, 9, 0.0, Admission.ADMIT),  # below early drop: always admitted
        (10, 10, 0.99, Admission.DROP_SOURCE),  # the source's cap comes first
        (64, 0, 0.99, Admission.DROP_FULL),
        (100, 0, 0.99, Admission.DROP_FULL),
        (32, 0, 0.0, Admission.DROP_EARLY),  # at early drop, p = 1/32
        (32, 0, 0.5, Admission.ADMIT),
        (48, 0, 0.5, Admission.DROP_EARLY),  # halfway, p = 17/32
        (63, 0, 0.99, Admission.DROP_EARLY),  # just below the cap, p = 1
    ],
)
def test_admission_table(
    pending: int, from_source: int, draw: float, expected: Admission
) -> None:
    """Per-source cap, hard cap and random early drop decide as the table says."""
    assert (
        admit(LIMITS, pending=pending, pending_from_source=from_source, draw=draw)
        is expected
    )


@given(st.integers(0, 200), st.integers(0, 20), st.floats(0, 1, exclude_max=True))
def test_admission_never_exceeds_caps(
    pending: int, from_source: int, draw: float
) -> None:
    """Whatever the draw, nothing is admitted at or above either cap."""
    decision = admit(
        LIMITS, pending=pending, pending_from_source=from_source, draw=draw
    )
    if pending >= LIMITS.hard_cap or from_source >= LIMITS.per_source:
        assert decision is not Admission.ADMIT
    if pending < LIMITS.early_drop and from_source < LIMITS.per_source:
        assert decision is Admission.ADMIT


def _backoff() -> Backoff:
    return Backoff(base_s=1.0, cap_s=60.0, auth_failure_s=900.0)


def test_backoff_ceiling_doubles_to_the_cap() -> None:
    """Ceilings go 1, 2, 4 ... and stop at 60 s; the delay is draw * ceiling (full jitter)."""
    backoff = _backoff()
    ceilings = []
    for _ in range(10):
        ceilings.append(backoff.ceiling_s())
        assert backoff.next_delay_s(0.5) == ceilings[-1] / 2
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


def test_backoff_survives_a_long_outage() -> None:
    """After thousands of failures the ceiling is still the cap (no overflow)."""
    backoff = _backoff()
    backoff.failures = 10_000
    assert backoff.next_delay_s(0.999) < 60.0


def test_network_failures_use_jitter() -> None:
    """A network failure waits draw * ceiling and is not an auth wait."""
    backoff = _backoff()
    delay, auth_wait = plan_retry(
        backoff,
        Outcome.NETWORK,
        eof_streak=0,
        eof_threshold=3,
        connected_for_s=0,
        stable_after_s=60,
        draw=0.25,
    )
    assert (delay, auth_wait) == (0.25, False)


@pytest.mark.parametrize("outcome", [Outcome.REFUSED, Outcome.LOCAL_CERTIFICATE])
def test_refused_certificate_waits_long(outcome: Outcome) -> None:
    """A refused or unusable certificate waits the fixed auth-failure delay (>= 15 min)."""
    delay, auth_wait = plan_retry(
        _backoff(),
        outcome,
        eof_streak=0,
        eof_threshold=3,
        connected_for_s=0,
        stable_after_s=60,
        draw=0.0,
    )
    assert auth_wait
    assert delay == 900.0


def test_repeated_eof_after_tls_counts_as_refusal() -> None:
    """EOF right after TLS is a network error twice, and a refusal the third time in a row."""
    backoff = _backoff()
    waits = [
        plan_retry(
            backoff,
            Outcome.EOF_AFTER_TLS,
            eof_streak=n,
            eof_threshold=3,
            connected_for_s=0,
            stable_after_s=60,
            draw=0.5,
        )[1]
        for n in (1, 2, 3)
    ]
    assert waits == [False, False, True]


def test_stable_connection_resets_backoff() -> None:
    """A connection that lasted stable_after_s starts the next backoff from the base."""
    backoff = _backoff()
    backoff.failures = 6
    delay, _ = plan_retry(
        backoff,
        Outcome.LOST,
        eof_streak=0,
        eof_threshold=3,
        connected_for_s=61,
        stable_after_s=60,
        draw=0.5,
    )
    assert delay == 0.5


def test_short_connection_keeps_backing_off() -> None:
    """A connection that dropped quickly does not reset the backoff (no tight loop)."""
    backoff = _backoff()
    backoff.failures = 6
    delay, _ = plan_retry(
        backoff,
        Outcome.LOST,
        eof_streak=0,
        eof_threshold=3,
        connected_for_s=1,
        stable_after_s=60,
        draw=0.5,
    )
    assert delay == 30.0


def test_close_code_labels_are_bounded() -> None:
    """Known close codes are their own label; anything else is "other"."""
    from relay.proto.close import CloseCode, close_code_label

    assert close_code_label(CloseCode.REVOKED) == "4001"
    assert close_code_label(1000) == "1000"
    assert close_code_label(4999) == "other"
