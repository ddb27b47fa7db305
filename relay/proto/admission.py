"""Admission of new connections while handshakes are pending (pure).

An unauthenticated connection costs the broker a TLS handshake (about 4 ms of CPU)
and a slot until its deadline. Like OpenSSH's ``MaxStartups start:rate:full``, the
broker refuses new connections with a probability that rises linearly from 0 at
``early_drop`` pending handshakes to 1 at ``hard_cap``, so a flood cannot hold every
slot while real devices still get through; and it caps what one source may hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Admission(Enum):
    """The answer for one new connection; the value is the metric label."""

    ADMIT = "admit"
    DROP_FULL = "pending_full"
    DROP_EARLY = "random_early_drop"
    DROP_SOURCE = "per_source_cap"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionLimits:
    """Limits on pending handshakes."""

    early_drop: int
    hard_cap: int
    per_source: int


def admit(
    limits: AdmissionLimits, *, pending: int, pending_from_source: int, draw: float
) -> Admission:
    """Decide whether to start a handshake for a new connection.

    Args:
        limits: The configured caps.
        pending: Handshakes in progress now, all sources.
        pending_from_source: Handshakes in progress from this connection's address.
        draw: A uniform random number in [0, 1), passed in to keep this pure.
    """
    if pending_from_source >= limits.per_source:
        return Admission.DROP_SOURCE
    if pending >= limits.hard_cap:
        return Admission.DROP_FULL
    if pending >= limits.early_drop:
        span = max(1, limits.hard_cap - limits.early_drop)
        drop_probability = (pending - limits.early_drop + 1) / span
        if draw < drop_probability:
            return Admission.DROP_EARLY
    return Admission.ADMIT
