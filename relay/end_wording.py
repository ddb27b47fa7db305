"""How each end reason of a remote session reads, for the engineer and on the device.

One table, used by the engineer CLI (:mod:`relay._trio.engineer_session`), and
served to the browser console and the device page as a generated JavaScript
module (:mod:`relay.console`), so a reason reads the same everywhere.

:data:`END_WORDING` speaks to the engineer ("ended by you"). The device page
speaks to the person at the instrument: :data:`DEVICE_END_WORDING` is the same
table with the reasons that name the engineer said from that side.
:data:`AUDIT_END_WORDING` is the device's table, for auditors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["AUDIT_END_WORDING", "DEVICE_END_WORDING", "END_WORDING"]

#: What the engineer reads for each end reason (:class:`relay.proto.session.EndReason`).
END_WORDING: Final[Mapping[str, str]] = {
    "engineer": "ended by you",
    "onsite": "ended by the person at the instrument",
    "device_shutdown": "the instrument's remote-care agent stopped",
    "time_cap": "one-hour limit reached",
    "admin": "ended by an administrator",
    "denied": "denied by the person at the instrument",
    "grant_timeout": "no answer at the instrument",
    "device_disconnect": "instrument disconnected",
    "engineer_disconnect": "your connection was lost",
    "revoked": "the instrument's certificate was revoked",
    "policy_revoked": "the access policy no longer allows this session",
    "login_ended": "your login ended",
    "broker_shutdown": "the relay is shutting down",
    "broker_crash": "a relay node stopped unexpectedly",
    "audit_failure": "the audit log could not be written",
    "cancelled": "request withdrawn",
}

#: What the person at the instrument reads: the engineer's table, with "you"
#: turned into the engineer.
DEVICE_END_WORDING: Final[Mapping[str, str]] = {
    **END_WORDING,
    "engineer": "ended by the engineer",
    "engineer_disconnect": "the engineer's connection was lost",
    "login_ended": "the engineer's login ended",
}

#: What auditors read: the device's table.
AUDIT_END_WORDING: Final[Mapping[str, str]] = DEVICE_END_WORDING
