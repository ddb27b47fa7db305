"""``relay serve``: one trio process, three listeners.

Theory of operation
===================
:func:`serve_broker` prepares what the listeners need (CA, listener certificate,
store), starts the device, engineer and metrics listeners in one nursery, reports
the bound ports through ``task_status`` and runs until *shutdown* is set. Then it
stops accepting device connections, closes every live control channel with 1001
("broker shutdown"), waits for them up to ``shutdown_grace_s`` and cancels the rest.
Remote sessions end with ``broker_shutdown`` before the control channels close,
so that each device still gets its ``SessionEnd``.
Blocking work (files, key generation, the database) runs in worker threads.

Certificates: :class:`~relay._trio.broker_pki.BrokerPKI` holds the listener
certificate and the device CAs and reloads them when their files change (every
``pki.tls_reload_poll_s``, and on SIGHUP when the broker runs in the main
thread); device certificate renewals over the control channel are signed by a
:class:`~relay._trio.certificate_renewal.Renewer` (docs/certificates.md).

Audit: the audit log (:class:`relay.audit_log.AuditLog`) opens before anything
else; every component's logger appends its ``audit=True`` events to it. Sessions
that the last process left open are closed as ``broker_crash`` before the
listeners start. :func:`_audit_watch` seals checkpoints on time and fails
closed: when the log stops being writable, every live session ends with
``audit_failure`` (new ones are refused by the session broker itself), and
writing is retried every ``audit.retry_s``. At the end the log is sealed with a
last checkpoint.

Memory: :func:`~relay._trio.memory_upkeep.run_memory_upkeep` frees the
reference cycles closed connections leave behind and trims the C heap every
``memory_upkeep_s``, so resident memory levels off under session churn.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final

import trio
from cryptography import x509

import auth
from relay._trio.broker_pki import BrokerPKI
from relay._trio.certificate_renewal import Renewer
from relay._trio.cluster_node import ClusterNode
from relay._trio.cross_node import CrossNode
from relay._trio.device_listener import DeviceListener, presence_stale_after
from relay._trio.engineer_listener import EngineerListener
from relay._trio.engineer_sockets import EngineerSockets
from relay._trio.enrollment_api import Enroller
from relay._trio.feed_intake import FeedIntake
from relay._trio.feed_requests import DataRequester
from relay._trio.http import metrics_app, serve_http
from relay._trio.login_service import LoginService
from relay._trio.memory_upkeep import freeze_startup_objects, run_memory_upkeep
from relay._trio.orphan_sessions import OrphanSweep
from relay._trio.policy_gate import PolicyGate, ceiling_of, load_policy
from relay._trio.session_api import SessionRoutes
from relay._trio.session_archive import SessionArchive
from relay._trio.session_broker import SessionBroker, SessionClock
from relay.audit_log import AuditLog, QueuedMirror, load_or_create_audit_key
from relay.config import AuditConfig, BrokerConfig
from relay.log import get_logger
from relay.metrics import RelayMetrics
from relay.pki_files import (
    DataDir,
    default_server_names,
    ensure_listener_certificate,
    listener_certificate_names,
    load_or_create_sealing_key,
)
from relay.presence import LocalPresence
from relay.proto.close import CloseCode
from relay.proto.node_command import CommandKind, NodeCommand
from relay.proto.session import EndReason
from relay.store import Store, StoreError
from relay.tls import engineer_listener_context


def _open_audit(
    config: BrokerConfig,
    metrics: RelayMetrics,
    wall_clock: Callable[[], datetime],
    mirror: QueuedMirror | None,
) -> AuditLog:
    data_dir = DataDir(config.data_dir)
    key = load_or_create_audit_key(data_dir.audit_key, data_dir.audit_public_key)
    return AuditLog(
        data_dir.audit_dir,
        signer=key,
        config=config.audit,
        wall_clock=wall_clock,
        mirror=mirror,
        on_write_failure=metrics.audit_write_failures.inc,
        on_health=lambda healthy: metrics.audit_writable.set(1 if healthy else 0),
    )


async def _audit_watch(
    audit: AuditLog,
    sessions: SessionBroker,
    archive: SessionArchive,
    metrics: RelayMetrics,
    config: AuditConfig,
    log: Any,
) -> None:
    """Seal checkpoints on time; fail closed while the log cannot be written."""
    was_healthy = True
    next_retry = 0.0
    while True:
        if audit.healthy:
            audit.tick()
        if not audit.healthy:
            now = trio.current_time()
            if was_healthy:
                was_healthy = False
                metrics.audit_failure_ends.inc()
                sessions.end_all(EndReason.AUDIT_FAILURE)
                next_retry = now + config.retry_s
            elif now >= next_retry:
                next_retry = now + config.retry_s
                if audit.recover():
                    was_healthy = True
                    log.warning("audit.writable_again", audit=True)
                    await archive.flush_deferred()
        await trio.sleep(config.watch_s)


async def _reload_on_sighup(
    pki: BrokerPKI,
    policy: PolicyGate,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload certificates and the access policy at once on SIGHUP (only in the
    main thread, where signals can be caught; tests and embedded brokers rely
    on polling). Started once the signal is caught: ``broker.started`` is
    logged after that, so a SIGHUP sent on seeing it is never lost."""
    if threading.current_thread() is not threading.main_thread():
        task_status.started()
        return
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            policy.reload_now()
            await pki.reload_now()


@dataclass(frozen=True, slots=True)
class BrokerPorts:
    """The ports the broker's listeners are bound to."""

    device: int
    engineer: int
    metrics: int


@dataclass(frozen=True, slots=True)
class _Prepared:
    store: Store
    pki: BrokerPKI
    engineer_context: ssl.SSLContext
    dev_certificate_issued: bool
    sealer: auth.SecretSealer
    sealing_key_origin: str
    hasher: auth.PasswordHasher
    certificate_names: list[str]

    @property
    def ca(self) -> auth.CertificateAuthority | None:
        """The device CA with its key, for API enrollment; None without the key."""
        return self.pki.current.signing_ca

    @property
    def ca_certificate(self) -> x509.Certificate:
        return self.pki.current.ca_certificate

    @property
    def cert_file(self) -> Any:
        return self.pki.cert_file

    @property
    def key_file(self) -> Any:
        return self.pki.key_file


def _prepare(config: BrokerConfig, now: datetime, pki_factory: Any) -> _Prepared:
    data_dir = DataDir(config.data_dir)
    sealing_key, sealing_key_origin = load_or_create_sealing_key(
        data_dir,
        config.engineer_auth.totp_sealing_key
        or os.environ.get("RELAY_TOTP_SEALING_KEY"),
    )
    # The CA key signs CSRs for POST /api/v1/enrollments and renewals. A broker
    # without it (the key kept offline, certificates signed with `relay ca sign`
    # elsewhere) still verifies devices with ca.crt; the route answers 503 then.
    # A key that is present but unusable stops the start (CAError), as for
    # `relay ca sign` (BrokerPKI.load_initial loads both).
    issued = False
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        cert_file, key_file = config.tls_cert_file, config.tls_key_file
    else:
        issued = ensure_listener_certificate(
            data_dir,
            names=default_server_names(config.server_names),
            now=now,
            lifetime=timedelta(days=config.pki.server_cert_lifetime_days),
        )
        cert_file, key_file = data_dir.listener_cert, data_dir.listener_key
    dev_mode = config.tls_cert_file is None or config.tls_key_file is None
    pki: BrokerPKI = pki_factory(cert_file, key_file, dev_mode)
    pki.load_initial(now)
    # Built here and kept: a reloaded certificate goes into this very object.
    engineer_context = engineer_listener_context(cert_file=cert_file, key_file=key_file)
    # Computes one argon2 hash (the unknown-user dummy): worker thread work too.
    hasher = auth.PasswordHasher()
    store = Store.open(config.effective_database_url)
    return _Prepared(
        store,
        pki,
        engineer_context,
        issued,
        auth.SecretSealer(sealing_key),
        sealing_key_origin,
        hasher,
        listener_certificate_names(cert_file),
    )


class UnsupportedCommand(Exception):
    """A command from another node that this version does not carry out."""


@dataclass(frozen=True, slots=True)
class _CommandTargets:
    """What commands from other nodes act on."""

    sessions: SessionBroker
    policy: PolicyGate
    crossing: CrossNode
    devices: DeviceListener
    sockets: EngineerSockets
    data_requests: DataRequester


async def _carry_out(
    targets: _CommandTargets, command: NodeCommand
) -> Mapping[str, str] | None:
    """Carry out a command from another node (see relay._trio.node_bus).

    Revocations and disabled users reach every node through the store's feeds
    within ``revocation_poll_s`` anyway; ``revoke_device`` and
    ``disable_user`` (sent by ``relay device revoke`` and ``relay user
    disable`` to every live node) have the node read its feed at once, and
    the confirmation says it did. A command this version does not carry out
    is not confirmed, so its sender learns that it failed.
    """
    sessions, policy = targets.sessions, targets.policy
    if command.kind in _CROSSING_KINDS:
        return await targets.crossing.carry_out(command)
    if command.kind is CommandKind.DATA_REQUEST:
        return await targets.data_requests.carry_out(command.args)
    if command.kind is CommandKind.REVOKE_DEVICE:
        if not await targets.devices.revocations_now():
            raise UnsupportedCommand("the store could not be read")
        return None
    if command.kind is CommandKind.DISABLE_USER:
        if not await targets.sockets.revocations_now():
            raise UnsupportedCommand("the store could not be read")
        return None
    if command.kind is CommandKind.END_SESSION:
        if command.args["reason"] != "admin":
            raise UnsupportedCommand(f"end reason {command.args['reason']!r}")
        await sessions.end(command.args["session_id"], by_admin=True, by_owner=False)
    elif command.kind is CommandKind.POLICY_RELOAD:
        await policy.reload_and_wait()
    else:
        raise UnsupportedCommand(str(command.kind))
    return None


_CROSSING_KINDS: Final = frozenset(
    {
        CommandKind.CLAIM_DEVICE,
        CommandKind.DEVICE_SEND,
        CommandKind.RELEASE_DEVICE,
        CommandKind.DEVICE_EVENT,
        CommandKind.CONTROL_LOST,
    }
)


async def serve_broker(
    config: BrokerConfig,
    shutdown: trio.Event,
    *,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    metrics: RelayMetrics | None = None,
    sessions_hook: Callable[[SessionBroker], None] | None = None,
    pki_hook: Callable[[BrokerPKI], None] | None = None,
    freeze_startup: bool = False,
    task_status: trio.TaskStatus[BrokerPorts] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the broker until *shutdown* is set; see the module docstring.

    *sessions_hook*, if given, is called with the session broker once it exists
    (tests inspect it: sessions held, their tasks). *pki_hook* likewise gets
    the :class:`BrokerPKI` (its ``reload_now()`` reloads certificates at once).
    *freeze_startup* (``relay serve``: one broker per process) moves what the
    start-up created out of the garbage collector's reach
    (:func:`~relay._trio.memory_upkeep.freeze_startup_objects`); a process
    that runs many brokers one after another (the tests) leaves it off.

    Raises:
        CAError: The data dir has no usable CA.
        AuditLogCorrupt: The audit log's last line is not a record; the
            broker does not append to a chain it cannot continue.
    """
    metrics = metrics if metrics is not None else RelayMetrics()
    # stdout gets a copy of each record for a log shipper, from a thread: a
    # shipper that stalls must not stall the broker.
    mirror = (
        QueuedMirror(
            sys.stdout,
            max_lines=config.audit.mirror_max_lines,
            on_drop=metrics.audit_mirror_dropped.inc,
        )
        if config.audit.stdout
        else None
    )
    try:
        audit = await trio.to_thread.run_sync(
            _open_audit, config, metrics, wall_clock, mirror
        )
        try:
            await _serve(
                config,
                shutdown,
                audit,
                wall_clock,
                metrics,
                sessions_hook,
                pki_hook,
                freeze_startup,
                task_status,
            )
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(audit.close)
            if audit.lost_at_close:
                get_logger("broker").error(
                    "audit.records_lost_at_stop",
                    records=audit.lost_at_close,
                    error=audit.last_error,
                )
    finally:
        if mirror is not None:
            mirror.close()


async def _serve(
    config: BrokerConfig,
    shutdown: trio.Event,
    audit: AuditLog,
    wall_clock: Callable[[], datetime],
    metrics: RelayMetrics,
    sessions_hook: Callable[[SessionBroker], None] | None,
    pki_hook: Callable[[BrokerPKI], None] | None,
    freeze_startup: bool,
    task_status: trio.TaskStatus[BrokerPorts],
) -> None:
    log = get_logger("broker", audit=audit)
    log.info(
        "broker.config_loaded",
        data_dir=str(config.data_dir),
        device_listen=f"{config.device_listen.host}:{config.device_listen.port}",
        engineer_listen=f"{config.engineer_listen.host}:{config.engineer_listen.port}",
        metrics_listen=f"{config.metrics_listen.host}:{config.metrics_listen.port}",
        max_session_seconds=config.sessions.max_session_seconds,
        grant_timeout_s=str(config.sessions.grant_timeout_s),
        allowed_channels=list(config.sessions.allowed_channels),
        record_input=config.audit.record_input,
        checkpoint_every_records=config.audit.checkpoint_every_records,
        checkpoint_every_s=str(config.audit.checkpoint_every_s),
        audit=True,
    )
    pki_log = get_logger("pki", audit=audit)

    def pki_factory(cert_file: Any, key_file: Any, dev_mode: bool) -> BrokerPKI:
        return BrokerPKI(
            config,
            cert_file=cert_file,
            key_file=key_file,
            dev_mode=dev_mode,
            metrics=metrics,
            log=pki_log,
            wall_clock=wall_clock,
        )

    prepared = await trio.to_thread.run_sync(
        _prepare, config, wall_clock(), pki_factory
    )
    pki = prepared.pki
    pki.engineer_context = prepared.engineer_context
    if pki_hook is not None:
        pki_hook(pki)
    if prepared.dev_certificate_issued:
        log.warning(
            "tls.dev_certificate_issued",
            path=str(prepared.cert_file),
            detail="dev mode: listener certificate issued by the local CA",
        )
    log.info(
        "auth.totp_sealing_key_loaded",
        origin=prepared.sealing_key_origin,
        audit=True,
    )
    store = prepared.store
    if prepared.ca is None:
        log.warning(
            "enrollment.api_disabled",
            path=str(DataDir(config.data_dir).ca_key),
            detail="no CA key on this broker: POST /api/v1/enrollments answers 503",
        )
    enroller = Enroller(
        ca=prepared.ca,
        store=store,
        config=config.pki,
        metrics=metrics,
        log=get_logger("enrollment_api", audit=audit),
        wall_clock=wall_clock,
    )
    login_service = LoginService(
        store=store,
        hasher=prepared.hasher,
        sealer=prepared.sealer,
        config=config.engineer_auth,
        metrics=metrics,
        log=get_logger("engineer_api", audit=audit),
        wall_clock=wall_clock,
    )
    node_id = config.cluster.effective_node_id
    presence = LocalPresence()
    cluster = (
        ClusterNode(
            config.cluster,
            node_id=node_id,
            local_devices=lambda: {
                entry.device_id: entry.connection_id for entry in presence.all()
            },
            metrics=metrics,
            log=get_logger("cluster", audit=audit),
        )
        if config.cluster.redis_url is not None
        else None
    )
    listener = DeviceListener(
        config=config,
        ssl_context=pki.current.device_context,
        ca_certificate=pki.current.ca_certificate,
        previous_ca_certificates=pki.current.trusted[1:],
        store=store,
        presence=presence,
        metrics=metrics,
        log=get_logger("device_listener", audit=audit),
        node_id=node_id,
        wall_clock=wall_clock,
    )
    listener.renewer = Renewer(
        pki=pki,
        store=store,
        config=config.pki,
        metrics=metrics,
        log=get_logger("device_listener", audit=audit),
        wall_clock=wall_clock,
    )
    feed_log = get_logger("feed", audit=audit)
    listener.feed = feed_intake = FeedIntake(
        store=store,
        config=config.feed,
        metrics=metrics,
        log=feed_log,
        wall_clock=wall_clock,
    )
    data_requester = DataRequester(
        store=store,
        channels=listener,
        config=config.feed,
        metrics=metrics,
        log=feed_log,
        wall_clock=wall_clock,
        fleet=cluster,
    )
    pki.listener = listener
    pki.enroller = enroller
    pki.update_gauges()
    session_log = get_logger("sessions", audit=audit)
    crossing = (
        CrossNode(
            cluster,
            channels=listener,
            tunnel_url=config.cluster.advertise_device_url,
            log=session_log,
            on_drop=lambda kind: metrics.node_commands.labels(kind, "dropped").inc(),
        )
        if cluster is not None
        else None
    )
    archive = SessionArchive(
        store=store,
        recordings_dir=DataDir(config.data_dir).recordings,
        config=config.audit,
        node_id=node_id,
        log=session_log,
        audit_dir=DataDir(config.data_dir).audit_dir,
        wall_clock=wall_clock,
    )
    crashed = await archive.recover()
    if crashed:
        log.warning("broker.recovered_sessions", sessions=crashed, audit=True)
    # The policy loads before anything listens: one that does not load stops
    # the broker here, with the file, rule and key in the error.
    policy = PolicyGate(
        config=config.policy,
        ceiling=ceiling_of(config),
        policy=await trio.to_thread.run_sync(load_policy, config.policy),
        store=store,
        metrics=metrics,
        log=get_logger("policy", audit=audit),
        wall_clock=wall_clock,
    )
    policy.log_loaded()
    sessions = SessionBroker(
        config=config.sessions,
        control=listener,
        metrics=metrics,
        log=session_log,
        policy=policy,
        clock=SessionClock(wall_clock),
        archive=archive,
        audit_ok=lambda: audit.healthy,
        audit_seq=lambda: audit.seq,
        fleet=cluster,
        crossing=crossing,
    )
    listener.sessions = sessions
    if crossing is not None:
        crossing.sessions = sessions
    if sessions_hook is not None:
        sessions_hook(sessions)
    engineer_listener = EngineerListener(
        login_service,
        store=store,
        config=config.engineer_listener,
        presence_stale_after=presence_stale_after(config),
        log=get_logger("engineer_api", audit=audit),
        wall_clock=wall_clock,
        enroller=enroller,
        sessions=SessionRoutes(sessions, metrics),
        audit_data=DataDir(config.data_dir),
        keepalive=config.websocket,
        policy=policy,
        data_requester=data_requester,
    )
    bound = False

    async def readiness() -> dict[str, bool]:
        try:
            await trio.to_thread.run_sync(store.ping)
            store_ok = True
        except StoreError:
            store_ok = False
        return {
            "listeners_bound": bound,
            "store_reachable": store_ok,
            "data_dir_writable": os.access(config.data_dir, os.W_OK),
            "audit_writable": audit.healthy,
        }

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sessions.run)
            await nursery.start(data_requester.run)
            await nursery.start(feed_intake.run)
            nursery.start_soon(
                _audit_watch,
                audit,
                sessions,
                archive,
                metrics,
                config.audit,
                log,
            )
            device_port = await nursery.start(listener.serve)
            engineer_port = await nursery.start(
                partial(
                    engineer_listener.serve,
                    config.engineer_listen,
                    tls_files=(prepared.cert_file, prepared.key_file),
                    certificate_names=prepared.certificate_names,
                    ssl_context=prepared.engineer_context,
                )
            )
            metrics_port = await nursery.start(
                lambda task_status: serve_http(
                    metrics_app(metrics, readiness),
                    config.metrics_listen,
                    task_status=task_status,
                )
            )
            nursery.start_soon(pki.watch)
            await nursery.start(policy.run, sessions.recheck_policy)
            await nursery.start(_reload_on_sighup, pki, policy)
            if cluster is not None and crossing is not None:
                nursery.start_soon(OrphanSweep(cluster, archive, log=log).run)
                await nursery.start(crossing.run)
                await nursery.start(
                    partial(
                        cluster.run,
                        partial(
                            _carry_out,
                            _CommandTargets(
                                sessions,
                                policy,
                                crossing,
                                listener,
                                engineer_listener.sockets,
                                data_requester,
                            ),
                        ),
                        info={
                            "device_port": device_port,
                            "engineer_port": engineer_port,
                            "device_url": config.cluster.advertise_device_url,
                        },
                    )
                )
            if freeze_startup:
                freeze_startup_objects()
            nursery.start_soon(run_memory_upkeep, config.memory_upkeep_s, metrics)
            bound = True
            ports = BrokerPorts(
                device=device_port, engineer=engineer_port, metrics=metrics_port
            )
            log.info(
                "broker.started",
                device_port=ports.device,
                engineer_port=ports.engineer,
                metrics_port=ports.metrics,
                data_dir=str(config.data_dir),
                audit=True,
            )
            task_status.started(ports)
            await shutdown.wait()
            log.info(
                "broker.stopping",
                live_devices=listener.live_count(),
                live_sessions=len(sessions),
                audit=True,
            )
            # One deadline for all of it: the process must be gone within the
            # BRIEF's 10 s of SIGTERM, whatever a peer does.
            deadline = trio.current_time() + config.shutdown_grace_s
            listener.accepting = False
            sessions.stop()
            with trio.move_on_at(deadline):
                await sessions.wait_idle()
            listener.close_all(CloseCode.GOING_AWAY, "broker shutdown", "shutdown")
            with trio.move_on_at(deadline):
                await listener.wait_idle()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
        log.info("broker.stopped", audit=True)
