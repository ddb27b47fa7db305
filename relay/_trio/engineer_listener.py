"""The engineer listener as one piece: the app, its WebSocket registry, its feed.

Theory of operation
===================
:class:`EngineerListener` builds the Starlette app (:func:`relay._trio.http.engineer_app`)
together with what its WebSockets need while they live: the
:class:`~relay._trio.engineer_sockets.EngineerSockets` registry and its watcher,
and the shared :class:`~relay._trio.device_feed.DeviceFeed`. :meth:`serve` runs
the watcher and the feed, then Hypercorn, in one nursery. Given the data dir,
it adds the auditors' routes (:mod:`relay._trio.audit_api`) to the app.

The Origin allow-list is ``allowed_origins`` from the config when that is set;
otherwise it is the listener's own origins, ``https://NAME:PORT`` for each DNS
name and IP address in the listener certificate, known only once the port is
bound. Until then the list is empty and every browser upgrade is refused, which
is safe: nothing can connect before the bind anyway.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import trio
from starlette.routing import BaseRoute

import auth
from relay._trio.audit_api import AuditRoutes
from relay._trio.device_feed import DeviceFeed
from relay._trio.engineer_api import audit_routes, device_list
from relay._trio.engineer_sockets import EngineerSockets
from relay._trio.enrollment_api import Enroller
from relay._trio.feed_api import DataRequests, PolicySource
from relay._trio.http import engineer_app, serve_http
from relay._trio.login_service import LoginService
from relay._trio.session_api import SessionRoutes
from relay.config import EngineerListenerConfig, ListenAddress, WebSocketLimits
from relay.pki_files import DataDir
from relay.store import Store

__all__ = ["EngineerListener"]


class EngineerListener:
    """The engineer listener's app and its background work.

    Args:
        service: Login and session checks.
        store: For the session revocation feed.
        config: The listener's limits, intervals and allowed origins.
        presence_stale_after: When a device's presence row counts as stale.
        log: Structured logger.
        wall_clock: The current time, timezone-aware.
        enroller: Signs CSRs for ``POST /api/v1/enrollments``.
        sessions: The remote-session routes, when the broker runs sessions.
        audit_data: The data dir whose audit log and recordings the auditors'
            routes (``/api/v1/audit/...``) read; None: no such routes.
        keepalive: The ping interval and missed-ping count the engineers'
            WebSockets are held to (relay._trio.hypercorn_ws); None: no pings.
        policy: The access policy in force, which decides which instruments
            engineers see (relay._trio.feed_api.DeviceVisibility).
        data_requester: Sends users' data requests to instruments; None:
            ``POST .../data-requests`` answers 503.

    Raises:
        ValueError: An entry of ``allowed_origins`` is not a web origin.
    """

    def __init__(
        self,
        service: LoginService,
        *,
        store: Store,
        config: EngineerListenerConfig,
        presence_stale_after: timedelta,
        log: Any,
        wall_clock: Callable[[], datetime],
        enroller: Enroller,
        sessions: SessionRoutes | None = None,
        audit_data: DataDir | None = None,
        keepalive: WebSocketLimits | None = None,
        policy: PolicySource | None = None,
        data_requester: DataRequests | None = None,
    ) -> None:
        self.config = config
        self.keepalive = keepalive
        self.sockets = EngineerSockets(
            login=service,
            store=store,
            config=config,
            metrics=service.metrics,
            log=log,
            wall_clock=wall_clock,
        )
        self.feed = DeviceFeed(
            read=partial(
                device_list,
                service,
                stale_after=presence_stale_after,
                in_session=None if sessions is None else sessions.device_in_session,
            ),
            interval_s=config.device_feed_interval_s,
            metrics=service.metrics,
            log=log,
        )
        self.origins = auth.OriginAllowList(config.allowed_origins)
        extra_routes: list[BaseRoute] = []
        if audit_data is not None:
            audit = AuditRoutes(
                store=store,
                audit_dir=audit_data.audit_dir,
                recordings_dir=audit_data.recordings,
                log=log,
            )
            extra_routes = audit_routes(service, audit, origins=lambda: self.origins)
        self.app = engineer_app(
            service,
            presence_stale_after=presence_stale_after,
            config=config,
            sockets=self.sockets,
            device_feed=self.feed,
            origins=lambda: self.origins,
            enroller=enroller,
            sessions=sessions,
            extra_routes=extra_routes,
            store=store,
            policy=policy,
            data_requester=data_requester,
        )

    async def serve(
        self,
        bind: ListenAddress,
        *,
        tls_files: tuple[Path, Path],
        certificate_names: Iterable[str],
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the bound port.

        Args:
            bind: Address to listen on; port 0 picks a free port.
            tls_files: (certificate chain, key).
            certificate_names: The DNS names and IP addresses of the listener
                certificate, for the default Origin allow-list.
            ssl_context: The HTTPS context, when the caller keeps it (to reload
                the certificate in place); else one is made from *tls_files*.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sockets.watch)
            await nursery.start(self.feed.run)
            port: int = await nursery.start(
                partial(
                    serve_http,
                    self.app,
                    bind,
                    tls_files=tls_files,
                    ssl_context=ssl_context,
                    limits=self.config,
                    keepalive=self.keepalive,
                )
            )
            if not self.config.allowed_origins:
                self.origins = auth.OriginAllowList(
                    auth.origins_for_names(certificate_names, port)
                )
            task_status.started(port)
