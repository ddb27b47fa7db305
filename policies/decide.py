"""Decide one session request against a policy: default deny, most restrictive wins.

The steps, in order (the first refusal is the answer):

1. Only engineers and admins hold sessions (``role``).
2. The rules that concern the engineer and the device are those whose role,
   group and device label selectors all match; the decision names them.
3. A deny rule among them refuses (inside its time windows, if it has any).
4. No allow rule among them: refused (``no_matching_rule``): default deny.
5. The allow rules are combined into :class:`~policies.model.Limits`, each
   limit the most restrictive of them and of the broker's own ceiling
   (:class:`Ceiling`: its configured cap, grant timeout and channels): the
   channels every one allows, the smallest cap and grant timeout, a reason
   required if any requires one and matching every pattern, the smallest
   session count, auditors watching only if all let them.
6. Then the request is held against them: each allow rule's time windows (a
   session never runs past the end of the window it started in), the
   channels, the reason, the engineer's live session count.

Nothing here reads a clock or a file: the request carries its time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from policies.channels import ChannelSet
from policies.model import (
    SESSION_ROLES,
    AccessRequest,
    Decision,
    Denial,
    Effect,
    Limits,
    Policy,
    Rule,
)

__all__ = ["Ceiling", "decide"]

#: Invariant 2: no session lasts longer, whatever a policy or config says.
SESSION_CAP_CEILING_S = 3600


@dataclass(frozen=True, slots=True)
class Ceiling:
    """The broker's configuration, above every rule (``[sessions]``).

    Attributes:
        max_session_seconds: ``sessions.max_session_seconds``.
        grant_timeout_s: ``sessions.grant_timeout_s``.
        channels: ``sessions.allowed_channels``.
    """

    max_session_seconds: int = SESSION_CAP_CEILING_S
    grant_timeout_s: float = 60.0
    channels: ChannelSet = field(default_factory=ChannelSet.everything)


def decide(policy: Policy, request: AccessRequest, ceiling: Ceiling) -> Decision:
    """The decision on *request* (see the module docstring for the steps)."""
    return replace(_decide(policy, request, ceiling), policy_digest=policy.digest)


def _decide(policy: Policy, request: AccessRequest, ceiling: Ceiling) -> Decision:
    engineer, device = request.engineer, request.device
    if engineer.role not in SESSION_ROLES:
        return Decision(
            allowed=False,
            rules=(),
            code=Denial.ROLE,
            message=f"role {engineer.role} does not hold remote sessions",
        )
    applied = [r for r in policy.rules if r.mismatch(engineer, device) is None]
    names = tuple(r.name for r in applied)
    for rule in applied:
        if rule.effect is Effect.DENY and (
            not rule.windows or rule.window_end(request.at) is not None
        ):
            return Decision(
                allowed=False,
                rules=names,
                code=Denial.DENIED_BY_RULE,
                message=f"denied by rule {rule.name}"
                + (f": {rule.description}" if rule.description else ""),
            )
    allows = [r for r in applied if r.effect is Effect.ALLOW]
    if not allows:
        return Decision(
            allowed=False,
            rules=names,
            code=Denial.NO_MATCHING_RULE,
            message=f"no rule allows {engineer.name} ({engineer.role}) a session "
            f"on {device.device_id}",
        )
    limits = _limits(allows, ceiling, request)
    refusal = _refusal(allows, limits, request)
    if refusal is not None:
        code, message = refusal
        return Decision(
            allowed=False, rules=names, code=code, message=message, limits=limits
        )
    return Decision(allowed=True, rules=names, limits=limits)


def _limits(allows: list[Rule], ceiling: Ceiling, request: AccessRequest) -> Limits:
    channels = ceiling.channels
    cap = min(ceiling.max_session_seconds, SESSION_CAP_CEILING_S)
    grant_timeout = ceiling.grant_timeout_s
    counts = []
    window_end = None
    for rule in allows:
        if rule.channels is not None:
            channels &= rule.channels
        if rule.max_session_seconds is not None:
            cap = min(cap, rule.max_session_seconds)
        if rule.grant_timeout_s is not None:
            grant_timeout = min(grant_timeout, rule.grant_timeout_s)
        if rule.max_concurrent_sessions is not None:
            counts.append(rule.max_concurrent_sessions)
        end = rule.window_end(request.at) if rule.windows else None
        if end is not None and (window_end is None or end < window_end):
            window_end = end
    if window_end is not None:
        left = math.floor((window_end - request.at).total_seconds())
        cap = max(1, min(cap, left))
    return Limits(
        channels=channels,
        max_session_seconds=cap,
        grant_timeout_s=grant_timeout,
        reason_required=any(r.reason_required for r in allows),
        reason_patterns=tuple(
            r.reason_pattern.pattern for r in allows if r.reason_pattern is not None
        ),
        max_concurrent_sessions=min(counts) if counts else None,
        auditors_may_watch=all(r.auditors_may_watch for r in allows),
        window_ends_at=window_end,
    )


def _refusal(
    allows: list[Rule], limits: Limits, request: AccessRequest
) -> tuple[Denial, str] | None:
    for rule in allows:
        if rule.windows and rule.window_end(request.at) is None:
            windows = "; ".join(str(w) for w in rule.windows)
            return (
                Denial.OUTSIDE_WINDOW,
                f"outside the time windows of rule {rule.name} ({windows})",
            )
    for channel in request.channels:
        if channel not in limits.channels:
            return (
                Denial.CHANNEL_NOT_ALLOWED,
                f"channel not allowed: {channel} (allowed: {limits.channels})",
            )
    reason = request.reason.strip()
    if limits.reason_required and not reason:
        return Denial.REASON_REQUIRED, "a reason is required"
    for pattern in limits.reason_patterns:
        if re.search(pattern, request.reason) is None:
            return (
                Denial.REASON_MISMATCH,
                f"the reason must match the pattern {pattern}",
            )
    most = limits.max_concurrent_sessions
    if most is not None and request.live_sessions >= most:
        return (
            Denial.TOO_MANY_SESSIONS,
            f"{request.engineer.name} already holds {request.live_sessions} "
            f"session(s), the most allowed at once is {most}",
        )
    return None
