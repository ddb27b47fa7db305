"""The access policy of a running broker: loaded, reloaded, asked, rechecked.

Theory of operation
===================
The decisions themselves are pure (:func:`policies.decide`); this is the
shell around them. A :class:`PolicyGate` holds the policy loaded from
``[policy] dir`` (the one shipped in ``policies/default/`` when unset) and the
broker's own ceiling (``[sessions]``: cap, grant timeout, channels).

*Asking.* :meth:`PolicyGate.decide` reads what the decision depends on that
lives in the store, the engineer's groups and the device's labels, in a worker
thread, adds the wall clock's time, and decides. A store that cannot answer
refuses the request (the caller answers 503): no decision without its facts.

*Reloading.* :meth:`PolicyGate.run` looks at the directory every
``reload_poll_s`` (names, sizes and modification times of its ``*.toml``
files) and reloads when that changed, or at once on :meth:`reload_now`
(SIGHUP). A policy that loads replaces the old one (audit ``policy.loaded``
with its digest, files and rule count); one that does not is refused, the old
one stays, and the error names the file, the rule and the key (audit
``policy.reload_failed``). Files that hash the same are no change: no recheck,
and an audit record (``changed`` false) only when SIGHUP asked.

*Rechecking.* After a reload, and whenever the store's label and group change
feed moves (``relay device label``, ``relay user set`` in another process;
read every ``recheck_s``), the gate calls ``on_change``: the session broker
holds every live session against the policy again and ends the ones it no
longer allows with ``policy_revoked``. With the defaults a change reaches a
live session within about 3 s (BRIEF: 5 s).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import trio

from policies import (
    DEFAULT_POLICY_DIR,
    AccessRequest,
    Ceiling,
    ChannelSet,
    Decision,
    Device,
    Engineer,
    Policy,
    PolicyError,
    decide,
)
from relay.config import BrokerConfig, PolicyConfig
from relay.metrics import RelayMetrics
from relay.policy_files import load_policy_dir
from relay.store import StoreError

__all__ = ["PolicyGate", "PolicyStore", "ceiling_of", "load_policy"]

_Fingerprint = tuple[tuple[str, int, int], ...]


class PolicyStore(Protocol):
    """What the gate reads from the store (:class:`relay.store.Store` has it)."""

    def user_groups(self, username: str) -> frozenset[str]: ...

    def device_labels(self, device_id: str) -> dict[str, str]: ...

    def policy_subject_cursor(self) -> int: ...


def policy_dir(config: PolicyConfig) -> Path:
    """The directory the broker loads: ``[policy] dir`` or the shipped default."""
    return config.dir if config.dir is not None else DEFAULT_POLICY_DIR


def load_policy(config: PolicyConfig) -> Policy:
    """Load the configured policy (blocking: call it in a worker thread).

    Raises:
        PolicyError: It does not load; the error names file, rule and key.
    """
    return load_policy_dir(policy_dir(config))


def ceiling_of(config: BrokerConfig) -> Ceiling:
    """The broker's own limits, above every rule (``[sessions]``)."""
    sessions = config.sessions
    return Ceiling(
        max_session_seconds=sessions.max_session_seconds,
        grant_timeout_s=sessions.grant_timeout_s,
        channels=ChannelSet.parse(sessions.allowed_channels),
    )


@dataclass(frozen=True, slots=True)
class _Subjects:
    groups: frozenset[str]
    labels: dict[str, str]


class PolicyGate:
    """The loaded policy, asked for every session request (see the module docstring)."""

    def __init__(
        self,
        *,
        config: PolicyConfig,
        ceiling: Ceiling,
        policy: Policy,
        store: PolicyStore | None,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self._config = config
        self._ceiling = ceiling
        self._policy = policy
        self._store = store
        self._metrics = metrics
        self._log = log
        self._wall_clock = wall_clock
        self._reload_now = trio.Event()
        # reload_and_wait: requests made, and the last one a reload served.
        self._reload_requests = 0
        self._reloads_served = 0
        self._reloaded = trio.lowlevel.ParkingLot()
        self._fingerprint: _Fingerprint | None = None
        metrics.policy_rules.set(len(policy.rules))

    @property
    def policy(self) -> Policy:
        return self._policy

    def log_loaded(self, *, changed: bool = True) -> None:
        """The audit record of the policy in use (at start, after each reload,
        and after a SIGHUP that found the same files: ``changed`` false)."""
        policy = self._policy
        self._log.info(
            "policy.loaded",
            directory=str(policy_dir(self._config)),
            files=list(policy.files),
            rules=len(policy.rules),
            digest=policy.digest,
            changed=changed,
            audit=True,
        )

    async def decide(
        self,
        *,
        engineer: str,
        role: str,
        device_id: str,
        channels: tuple[str, ...],
        reason: str,
        live_sessions: int,
    ) -> Decision:
        """Decide one request (or recheck one live session, with ``live_sessions=0``).

        Raises:
            StoreError: The engineer's groups or the device's labels could not
                be read.
        """
        subjects = await trio.to_thread.run_sync(self._subjects, engineer, device_id)
        request = AccessRequest(
            engineer=Engineer(engineer, role, subjects.groups),
            device=Device(device_id, subjects.labels),
            channels=channels,
            reason=reason,
            at=self._wall_clock(),
            live_sessions=live_sessions,
        )
        decision = decide(self._policy, request, self._ceiling)
        outcome = "allowed" if decision.allowed else str(decision.code)
        self._metrics.policy_decisions.labels(outcome).inc()
        return decision

    def _subjects(self, engineer: str, device_id: str) -> _Subjects:
        if self._store is None:
            return _Subjects(frozenset(), {})
        return _Subjects(
            self._store.user_groups(engineer), self._store.device_labels(device_id)
        )

    def reload_now(self) -> None:
        """Reload at the next chance (SIGHUP), changed or not."""
        self._reload_now.set()

    async def reload_and_wait(self) -> None:
        """Reload now, changed or not, and return once that reload is done
        (loaded, or refused and on record): another node's ``policy_reload``
        is confirmed only then."""
        self._reload_requests += 1
        mine = self._reload_requests
        self._reload_now.set()
        while self._reloads_served < mine:
            await self._reloaded.park()

    async def run(
        self,
        on_change: Callable[[str], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Reload on change or SIGHUP, recheck on a reload or a subject change."""
        self._fingerprint = await trio.to_thread.run_sync(self._directory_fingerprint)
        cursor = await self._cursor(None)
        next_poll = trio.current_time() + self._config.reload_poll_s
        task_status.started()
        while True:
            with trio.move_on_after(self._config.recheck_s):
                await self._reload_now.wait()
            forced = self._reload_now.is_set()
            if forced or trio.current_time() >= next_poll:
                self._reload_now = trio.Event()
                serving = self._reload_requests  # asked for before this read
                next_poll = trio.current_time() + self._config.reload_poll_s
                changed = await self._maybe_reload(forced=forced)
                if forced:
                    self._reloads_served = serving
                    self._reloaded.unpark_all()
                if changed:
                    await on_change("policy_reload")
            moved = await self._cursor(cursor)
            if moved is not None and moved != cursor:
                cursor = moved
                await on_change("labels_or_groups")

    async def _cursor(self, current: int | None) -> int | None:
        if self._store is None:
            return current
        try:
            return await trio.to_thread.run_sync(self._store.policy_subject_cursor)
        except StoreError as exc:
            self._log.warning("policy.subject_feed_unreadable", error=str(exc)[:200])
            return current

    async def _maybe_reload(self, *, forced: bool) -> bool:
        """Reload if the files changed (or *forced*); whether the policy changed."""
        fingerprint = await trio.to_thread.run_sync(self._directory_fingerprint)
        if not forced and fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        try:
            policy = await trio.to_thread.run_sync(load_policy, self._config)
        except PolicyError as exc:
            self._metrics.policy_reloads.labels("refused").inc()
            self._log.error(
                "policy.reload_failed",
                directory=str(policy_dir(self._config)),
                file=exc.file,
                rule=exc.rule,
                key=exc.key,
                error=str(exc),
                kept_digest=self._policy.digest,
                audit=True,
            )
            return False
        if policy.digest == self._policy.digest:
            if forced:  # an operator asked: the answer goes on record
                self.log_loaded(changed=False)
            return False
        self._policy = policy
        self._metrics.policy_reloads.labels("reloaded").inc()
        self._metrics.policy_rules.set(len(policy.rules))
        self.log_loaded()
        return True

    def _directory_fingerprint(self) -> _Fingerprint | None:
        directory = policy_dir(self._config)
        try:
            entries = sorted(
                (p.name, st.st_size, st.st_mtime_ns)
                for p in directory.iterdir()
                if p.suffix == ".toml" and (st := p.stat())
            )
        except OSError:
            return None  # gone or unreadable: the reload says why
        return tuple(entries)
