"""Reconnect delays for the device agent (pure).

Exponential backoff with "full jitter" (the delay is uniform between 0 and the
current ceiling), which spreads a fleet's reconnects after a broker restart instead
of bringing every device back in the same second. A refused certificate is not a
network problem: retrying fast would only add load, so it waits a long, fixed time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(slots=True, kw_only=True)
class Backoff:
    """Ceiling state for full-jitter exponential backoff.

    Attributes:
        base_s: Ceiling of the first delay.
        cap_s: Largest ceiling.
        auth_failure_s: Fixed delay after an authentication failure.
    """

    base_s: float
    cap_s: float
    auth_failure_s: float
    failures: int = field(default=0)

    def ceiling_s(self) -> float:
        """The ceiling for the next delay: ``min(cap, base * 2**failures)``."""
        # Cap the exponent so the float never overflows on a long outage.
        exponent: int = min(self.failures, 30)
        return min(self.cap_s, self.base_s * float(2**exponent))

    def next_delay_s(self, draw: float) -> float:
        """Delay before the next attempt after a failure, and count the failure.

        Args:
            draw: A uniform random number in [0, 1).
        """
        delay = draw * self.ceiling_s()
        self.failures += 1
        return delay

    def auth_failure_delay_s(self) -> float:
        """Delay after the broker refused our certificate (no jitter needed: rare)."""
        self.failures += 1
        return self.auth_failure_s

    def reset(self) -> None:
        """Forget past failures (after a connection that stayed up long enough)."""
        self.failures = 0


class Outcome(Enum):
    """How one connection attempt of the agent ended."""

    LOST = "lost"  # was connected, then the connection ended
    NETWORK = "network"  # could not connect, or the broker did not answer
    REFUSED = "refused"  # the broker refused our certificate (403, or closed 4001)
    EOF_AFTER_TLS = "eof_after_tls"  # closed right after TLS, before any HTTP answer
    LOCAL_CERTIFICATE = "local_certificate"  # our certificate is expired or missing


def plan_retry(
    backoff: Backoff,
    outcome: Outcome,
    *,
    eof_streak: int,
    eof_threshold: int,
    connected_for_s: float,
    stable_after_s: float,
    draw: float,
) -> tuple[float, bool]:
    """Delay before the next attempt, and whether it is an authentication wait.

    A connection that stayed up ``stable_after_s`` resets the backoff first, so a
    device that was fine for an hour reconnects quickly after a broker restart.
    ``eof_streak`` consecutive EOFs right after TLS are taken as a refused
    certificate: under TLS 1.3 a server that refuses the client certificate sends
    the client nothing it can tell apart from a dropped connection.
    """
    if outcome is Outcome.LOST and connected_for_s >= stable_after_s:
        backoff.reset()
    if outcome in (Outcome.REFUSED, Outcome.LOCAL_CERTIFICATE) or (
        outcome is Outcome.EOF_AFTER_TLS and eof_streak >= eof_threshold
    ):
        return backoff.auth_failure_delay_s(), True
    return backoff.next_delay_s(draw), False
