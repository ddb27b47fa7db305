"""Prometheus metrics of one broker process.

One :class:`RelayMetrics` per broker instance, each with its own registry, so that
tests can run several brokers in one process. Labels are bounded enums only: never
a device id, user name, session id or token (a label per device would make
10,000 series per broker).
"""

from __future__ import annotations

import platform

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

from relay import __version__
from relay.proto import feed

LISTENERS = ("device", "engineer")
#: Every outcome of POST /api/v1/enrollments that reached the route (auditors are
#: refused before it, in relay_auth_forbidden_total).
ENROLLMENT_OUTCOMES = (
    "signed",
    "bad_request",
    "bad_csr",
    "forbidden",
    "revoked",
    "already_enrolled",
    "unavailable",
    "store_error",
)

#: The monitoring feed's bounded label values: relay.proto.feed's closed sets.
FEED_KINDS = feed.KINDS
FEED_SEVERITIES = feed.SEVERITIES
FEED_REJECT_REASONS = feed.REJECT_REASONS
#: How a data request ends, as relay_feed_data_requests_total counts it.
DATA_REQUEST_OUTCOMES = (
    "sent",
    "answered",
    "refused",
    "lapsed",
    "offline",
    "agent_too_old",
    "other_node",
    "store_unavailable",
)

#: The directions of relay_tunnel_bytes_total and relay_tunnel_messages_total.
DIRECTIONS = ("to_device", "from_device")

#: Every outcome of a certificate renewal over the control channel.
RENEWAL_OUTCOMES = (
    "signed",
    "refused_revoked",
    "refused_superseded",
    "refused_expired",
    "bad_csr",
    "id_mismatch",
    "rate_limited",
    "unavailable",
    "store_error",
)

#: The certificates of relay_certificate_expiry_timestamp_seconds{certificate}:
#: the listener certificate (both TLS listeners serve it), the device CA, and the
#: previous device CA while a rollover is in progress.
EXPIRY_CERTIFICATES = ("listener", "device_ca", "device_ca_previous")

#: Outcomes of relay_tls_reloads_total.
TLS_RELOAD_OUTCOMES = ("reloaded", "refused")

#: Outcomes of relay_policy_decisions_total: allowed, or why not.
POLICY_OUTCOMES = (
    "allowed",
    "no_matching_rule",
    "denied_by_rule",
    "role",
    "channel_not_allowed",
    "reason_required",
    "reason_mismatch",
    "outside_window",
    "too_many_sessions",
)

#: The live session states of relay_sessions{state}.
SESSION_STATES = ("requested", "offered", "granted", "active")


def live_trio_tasks() -> float:
    """Tasks alive in the calling thread's trio run, NaN outside one.

    Read when ``/metrics`` is scraped (its route runs in the broker's loop), by
    walking the task tree from the root: nothing is counted on the hot path.
    """
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return float("nan")
    count = 0
    pending = [root] if root is not None else []
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return float(count)


class RelayMetrics:
    """The broker's metrics, registered in ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.devices_connected = Gauge(
            "relay_devices_connected",
            "Devices with an open control channel.",
            registry=r,
        )
        self.device_connects = Counter(
            "relay_device_connects_total", "Control channels opened.", registry=r
        )
        self.device_disconnects = Counter(
            "relay_device_disconnects_total",
            "Control channels closed, by reason.",
            ["reason"],
            registry=r,
        )
        self.device_rejections = Counter(
            "relay_device_rejections_total",
            "Device connections refused after the TLS handshake, by reason.",
            ["reason"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "relay_tls_handshake_failures_total",
            "TLS handshakes that failed, by listener and reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.pending_handshakes = Gauge(
            "relay_pending_handshakes",
            "Connections between accept and an open WebSocket.",
            ["listener"],
            registry=r,
        )
        self.connections_dropped = Counter(
            "relay_connections_dropped_total",
            "Connections dropped at accept by admission control, by reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.websocket_closes = Counter(
            "relay_websocket_closes_total",
            "WebSocket connections closed, by listener and close code.",
            ["listener", "code"],
            registry=r,
        )
        self.handler_errors = Counter(
            "relay_handler_errors_total",
            "Connection handlers that failed unexpectedly (a bug; see the logs).",
            ["listener"],
            registry=r,
        )
        self.store_errors = Counter(
            "relay_store_errors_total",
            "Store operations that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.auth_failures = Counter(
            "relay_auth_failures_total",
            "Failed engineer logins, by factor (user, password, totp) and reason.",
            ["factor", "reason"],
            registry=r,
        )
        self.auth_logins = Counter(
            "relay_auth_logins_total", "Successful engineer logins.", registry=r
        )
        self.auth_throttled = Counter(
            "relay_auth_throttled_total",
            "Requests refused with 429 on the engineer listener, by reason "
            "(rate_limit, source_delay, account_hourly_cap).",
            ["reason"],
            registry=r,
        )
        self.auth_token_rejections = Counter(
            "relay_auth_token_rejections_total",
            "Requests refused for their session token, by reason.",
            ["reason"],
            registry=r,
        )
        self.auth_forbidden = Counter(
            "relay_auth_forbidden_total",
            "Authenticated requests refused because of the user's role.",
            registry=r,
        )
        self.engineer_websockets = Gauge(
            "relay_engineer_websockets",
            "Engineer WebSockets open on the engineer listener.",
            registry=r,
        )
        self.engineer_messages_throttled = Counter(
            "relay_engineer_messages_throttled_total",
            "Times the broker held back reading an engineer's attach socket "
            "because its messages came faster than engineer_messages_per_s.",
            registry=r,
        )
        self.engineer_refusals = Counter(
            "relay_engineer_refusals_total",
            "Requests and WebSocket upgrades refused by the engineer listener "
            "before any route ran, by reason (head_too_large, bad_origin, "
            "no_origin_without_bearer, csrf, duplicate_session_cookie, "
            "duplicate_websocket_key), and session attaches refused "
            "(not_admitted).",
            ["reason"],
            registry=r,
        )
        self.enrollments = Counter(
            "relay_enrollments_total",
            "Device enrollments over the engineer API, by outcome (signed, "
            "bad_request, bad_csr, forbidden, revoked, unavailable, store_error).",
            ["outcome"],
            registry=r,
        )
        self.sessions = Gauge(
            "relay_sessions",
            "Remote sessions held by this broker, by state (requested, offered, "
            "granted, active).",
            ["state"],
            registry=r,
        )
        self.session_requests = Counter(
            "relay_session_requests_total",
            "POST /api/v1/sessions answers, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.session_ends = Counter(
            "relay_session_ends_total",
            "Remote sessions ended, by end reason.",
            ["reason"],
            registry=r,
        )
        self.grant_wait = Histogram(
            "relay_grant_wait_seconds",
            "From the offer to the verified grant.",
            buckets=(1, 2, 5, 10, 20, 30, 45, 60, 120),
            registry=r,
        )
        self.session_duration = Histogram(
            "relay_session_duration_seconds",
            "From the grant to the end, for granted sessions.",
            buckets=(1, 10, 60, 300, 600, 1200, 1800, 2700, 3600, 3700),
            registry=r,
        )
        self.teardown = Histogram(
            "relay_teardown_seconds",
            "From the decision to end a session to the close of every leg that "
            "was attached then (budget: on-site kill, engineer told <= 2 s).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.tunnel_bytes = Counter(
            "relay_tunnel_bytes_total",
            "Stream payload bytes relayed between the legs, by direction "
            "(to_device, from_device).",
            ["direction"],
            registry=r,
        )
        self.tunnel_messages = Counter(
            "relay_tunnel_messages_total",
            "Tunnel messages relayed between the legs (data and stream control), "
            "by direction (to_device, from_device).",
            ["direction"],
            registry=r,
        )
        self.audit_write_failures = Counter(
            "relay_audit_write_failures_total",
            "Audit records or checkpoints that could not be written (each failed "
            "attempt, recovery attempts included).",
            registry=r,
        )
        self.audit_writable = Gauge(
            "relay_audit_writable",
            "1 while the audit log is being written, 0 while it fails (no session "
            "starts then).",
            registry=r,
        )
        self.audit_writable.set(1)
        self.audit_failure_ends = Counter(
            "relay_audit_failure_periods_total",
            "Times the audit log stopped being writable (each one ended the live "
            "sessions with audit_failure).",
            registry=r,
        )
        self.audit_mirror_dropped = Counter(
            "relay_audit_mirror_dropped_total",
            "Copies of audit records not written to stdout because its reader "
            "fell behind (the records themselves are in the log).",
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "relay_certificate_expiry_timestamp_seconds",
            "Unix time at which a certificate the broker serves or trusts ends "
            "(notAfter), by certificate (listener, device_ca, device_ca_previous "
            "while a CA rollover is in progress).",
            ["certificate"],
            registry=r,
        )
        self.device_certificates_expiring_soon = Gauge(
            "relay_device_certificates_expiring_soon",
            "Connected devices whose certificate ends within the renewal window "
            "(pki.renew_before_days); a value that stays above 0 means renewals "
            "are failing.",
            registry=r,
        )
        self.certificate_renewals = Counter(
            "relay_device_certificate_renewals_total",
            "Device certificate renewals over the control channel, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "relay_tls_reloads_total",
            "Changed listener certificates or device CAs picked up from disk, by "
            "outcome (reloaded; refused: the files did not load, the old ones "
            "stay in use).",
            ["outcome"],
            registry=r,
        )
        self.trio_tasks = Gauge(
            "relay_trio_tasks",
            "Live trio tasks in the broker process, counted at scrape time (at "
            "rest it comes back to the same value; steady growth is a leak).",
            registry=r,
        )
        self.trio_tasks.set_function(live_trio_tasks)
        self.policy_decisions = Counter(
            "relay_policy_decisions_total",
            "Access policy decisions (session requests and rechecks of live "
            "sessions), by outcome: allowed, or the refusal code.",
            ["outcome"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "relay_policy_reloads_total",
            "Changed policy directories picked up, by outcome (reloaded; refused: "
            "the files did not load, the old policy stays in use).",
            ["outcome"],
            registry=r,
        )
        self.policy_rules = Gauge(
            "relay_policy_rules",
            "Rules in the access policy in use.",
            registry=r,
        )
        self.redis_up = Gauge(
            "relay_redis_up",
            "1 while this node reaches the shared Redis (its last heartbeat went "
            "through), 0 while it does not, and always on a single node (no "
            "[cluster] redis_url).",
            registry=r,
        )
        self.node_commands = Counter(
            "relay_node_commands_total",
            "Commands between broker nodes, by kind (end_session, revoke_device, "
            "disable_user, policy_reload; '-' for a message that did not decode) "
            "and outcome (sent: confirmed, unconfirmed; received: carried_out, "
            "repeated, failed, inbox_full, malformed; resubscribed).",
            ["kind", "outcome"],
            registry=r,
        )
        self.memory_upkeep = Histogram(
            "relay_memory_upkeep_seconds",
            "Duration of one memory upkeep (a full garbage collection, then "
            "glibc's malloc_trim in a worker thread); see memory_upkeep_s.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.gc_collected = Counter(
            "relay_gc_collected_objects_total",
            "Unreachable objects (reference cycles, mostly closed connections) "
            "freed by the memory upkeep.",
            registry=r,
        )
        self.feed_records = Counter(
            "relay_feed_records_stored_total",
            "Monitoring records stored (duplicates of stored ones not counted), "
            "by kind.",
            ["kind"],
            registry=r,
        )
        self.feed_duplicates = Counter(
            "relay_feed_records_duplicate_total",
            "Monitoring records received again after a lost ack and dropped by "
            "their idempotency key.",
            registry=r,
        )
        self.feed_alarms = Counter(
            "relay_feed_alarms_received_total",
            "Alarms received (raised or cleared), by severity.",
            ["severity"],
            registry=r,
        )
        self.feed_rejected = Counter(
            "relay_feed_records_rejected_total",
            "Monitoring records refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.feed_store_failures = Counter(
            "relay_feed_store_failures_total",
            "Monitoring records the store could not take (answered retry).",
            registry=r,
        )
        self.feed_deferred = Counter(
            "relay_feed_records_deferred_total",
            "Monitoring records answered retry (busy): beyond the node's "
            "max_records_per_s, or its write queue full (the agent sends them "
            "again later).",
            registry=r,
        )
        self.feed_queue_depth = Gauge(
            "relay_feed_agent_queue_depth",
            "Records waiting in the agents' queues, summed over the devices "
            "connected to this node (as they last reported).",
            registry=r,
        )
        self.feed_queue_depth_max = Gauge(
            "relay_feed_agent_queue_depth_max",
            "The deepest agent queue among the devices connected to this node.",
            registry=r,
        )
        self.feed_agent_dropped = Gauge(
            "relay_feed_agent_dropped_records",
            "Records the connected agents had to drop since they started (queue "
            "full), summed over this node's devices as they last reported.",
            registry=r,
        )
        self.feed_data_requests = Counter(
            "relay_feed_data_requests_total",
            "Requests for configuration or consumables, by outcome.",
            ["outcome"],
            registry=r,
        )
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds:
        # what an operator watches for a leak.
        ProcessCollector(registry=r)
        build = Info("relay_build", "Build information.", registry=r)
        build.info({"version": __version__, "python": platform.python_version()})
        for listener in LISTENERS:
            self.pending_handshakes.labels(listener)
        for outcome in ENROLLMENT_OUTCOMES:
            self.enrollments.labels(outcome)
        for outcome in POLICY_OUTCOMES:
            self.policy_decisions.labels(outcome)
        for outcome in TLS_RELOAD_OUTCOMES:
            self.policy_reloads.labels(outcome)
        for state in SESSION_STATES:
            self.sessions.labels(state)
        for outcome in RENEWAL_OUTCOMES:
            self.certificate_renewals.labels(outcome)
        for outcome in TLS_RELOAD_OUTCOMES:
            self.tls_reloads.labels(outcome)
        for kind in FEED_KINDS:
            self.feed_records.labels(kind)
        for severity in FEED_SEVERITIES:
            self.feed_alarms.labels(severity)
        for reason in FEED_REJECT_REASONS:
            self.feed_rejected.labels(reason)
        for outcome in DATA_REQUEST_OUTCOMES:
            self.feed_data_requests.labels(outcome)
        for direction in DIRECTIONS:
            self.tunnel_bytes.labels(direction)
            self.tunnel_messages.labels(direction)
