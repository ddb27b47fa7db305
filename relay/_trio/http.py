"""HTTP listeners on Hypercorn's trio worker: the metrics listener and the engineer
listener.

The metrics listener is plain HTTP and meant for an internal address (default
127.0.0.1:9464): ``/metrics`` (Prometheus text format), ``/healthz`` (the process
is alive) and ``/readyz`` (listeners bound, store reachable, data dir writable;
503 with the failing checks otherwise). Nothing else answers there, and none of
these routes exist on the device or engineer listeners.

The engineer listener is HTTPS: ``GET /`` answers the browser console, the
service name and version are at ``/api/v1/info``, and the engineer login and
API live under ``/api/v1/`` (see :mod:`relay._trio.engineer_api`; the security
headers are added by :mod:`relay._trio.engineer_middleware`).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

import auth
from relay import __version__
from relay._trio import hypercorn_ws
from relay._trio.device_feed import DeviceFeed
from relay._trio.engineer_api import api_routes
from relay._trio.engineer_middleware import (
    AmbiguousRequest,
    RequestHeadLimit,
    SecurityHeaders,
)
from relay._trio.engineer_sockets import EngineerSockets
from relay._trio.enrollment_api import Enroller
from relay._trio.feed_api import DataRequests, FeedStore, PolicySource
from relay._trio.login_service import LoginService
from relay._trio.session_api import SessionRoutes
from relay.config import EngineerListenerConfig, ListenAddress, WebSocketLimits
from relay.metrics import RelayMetrics
from relay.store import StoreError
from relay.tls import engineer_listener_context

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]

# Our WebSocket rules (keepalive that enforces, no compression) on Hypercorn.
hypercorn_ws.install()

#: What h11 buffers of a request head before refusing it on its own.
H11_MAX_INCOMPLETE_BYTES = 64 * 1024


class _HypercornConfig(HypercornConfig):
    """Hypercorn's config, with our TLS context instead of its own.

    Hypercorn's ``create_ssl_context`` assigns ``options = OP_NO_COMPRESSION``,
    which drops every other option (session tickets come back on); ours keeps
    the same settings as the device listener (relay/tls.py).
    """

    #: A context built by the caller (the broker keeps it to reload the
    #: certificate in place); used instead of one made from the files.
    relay_ssl_context: ssl.SSLContext | None = None
    #: Pings a WebSocket may leave unanswered before it is dead (with
    #: Hypercorn's ``websocket_ping_interval``; relay._trio.hypercorn_ws).
    relay_ping_missed_max: int = 3

    def create_ssl_context(self) -> ssl.SSLContext | None:
        if self.relay_ssl_context is not None:
            return self.relay_ssl_context
        if self.certfile is None or self.keyfile is None:
            return None
        return engineer_listener_context(
            cert_file=Path(self.certfile), key_file=Path(self.keyfile)
        )


def metrics_app(metrics: RelayMetrics, readiness: ReadinessCheck) -> Starlette:
    """The metrics listener's routes."""

    async def metrics_route(_request: Request) -> Response:
        return Response(
            generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_request: Request) -> Response:
        checks = await readiness()
        status = 200 if all(checks.values()) else 503
        return JSONResponse(
            {"ready": status == 200, "checks": checks}, status_code=status
        )

    return Starlette(
        routes=[
            Route("/metrics", metrics_route),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ]
    )


def engineer_app(
    service: LoginService,
    *,
    presence_stale_after: timedelta,
    config: EngineerListenerConfig,
    sockets: EngineerSockets,
    device_feed: DeviceFeed,
    origins: Callable[[], auth.OriginAllowList],
    enroller: Enroller,
    sessions: SessionRoutes | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    store: FeedStore | None = None,
    policy: PolicySource | None = None,
    data_requester: DataRequests | None = None,
) -> Starlette:
    """The engineer listener: the console, the banner, login, the API and the
    WebSockets (relay._trio.engineer_api), plus *extra_routes* (the auditors').

    *sockets* and *device_feed* do their work in tasks the caller runs
    (:meth:`EngineerSockets.watch`, :meth:`DeviceFeed.run`). *origins* is asked
    at every WebSocket upgrade, so that the listener's own origins can be set
    once its port is known. *store*, *policy* and *data_requester* mount the
    monitoring routes and filter every device list by what the user may see
    (see :func:`relay._trio.engineer_api.api_routes`).
    """

    def banner() -> dict[str, str]:
        return {"service": "remote-care-relay", "version": __version__}

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        # The database is down or locked: say so plainly (503, retry later) instead
        # of a bare 500; the operator gets the error in the log and a metric.
        service.metrics.store_errors.labels("engineer_api").inc()
        service.log.error(
            "store.failed",
            operation="engineer_api",
            path=request.url.path,
            error=str(exc),
        )
        return JSONResponse(
            {"error": "service unavailable"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    return Starlette(
        routes=api_routes(
            service,
            banner=banner,
            presence_stale_after=presence_stale_after,
            sockets=sockets,
            device_feed=device_feed,
            origins=origins,
            websocket_send_timeout_s=config.websocket_send_timeout_s,
            enroller=enroller,
            sessions=sessions,
            store=store,
            policy=policy,
            data_requester=data_requester,
        )
        + list(extra_routes),
        middleware=[
            # Outermost first: the head cap's 431 gets the security headers too.
            Middleware(SecurityHeaders),
            Middleware(
                RequestHeadLimit,
                max_bytes=config.max_request_head_bytes,
                metrics=service.metrics,
            ),
            Middleware(AmbiguousRequest, metrics=service.metrics),
        ],
        exception_handlers={StoreError: store_unavailable},
    )


async def serve_http(
    app: Starlette,
    bind: ListenAddress,
    *,
    tls_files: tuple[Path, Path] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    limits: EngineerListenerConfig | None = None,
    keepalive: WebSocketLimits | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *app* with Hypercorn until cancelled; reports the bound port.

    Args:
        app: The ASGI application.
        bind: Address to listen on; port 0 picks a free port.
        tls_files: (certificate chain, key) to serve HTTPS, or None for HTTP.
        ssl_context: The HTTPS context to use instead of one made from
            *tls_files* (which must be given too); the caller may reload its
            certificate in place (relay._trio.broker_pki).
        limits: The engineer listener's request and message limits, applied
            where Hypercorn enforces them.
        keepalive: Ping interval and missed pings for WebSockets (a silent
            client is dropped, relay._trio.hypercorn_ws); None: no pings.
    """
    config = _HypercornConfig()
    config.bind = [str(bind)]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 5
    config.graceful_timeout = 1
    if limits is not None:
        # h11 buffers a head up to this size while it arrives, then answers a
        # bare 431 itself. RequestHeadLimit refuses everything over the real cap
        # (8 KiB) with our JSON and headers, so h11's bound is only the memory
        # bound per connection, set well above the cap (a 17 KiB head comes in
        # two TLS records and would otherwise meet h11's bound first).
        config.h11_max_incomplete_size = max(
            H11_MAX_INCOMPLETE_BYTES, limits.max_request_head_bytes
        )
        config.websocket_max_message_size = limits.max_websocket_message_bytes
        # Hypercorn's own TLS deadline is 60 s: a slowloris would hold a
        # connection six times the budget (BRIEF: TLS + upgrade 10 s). The head
        # of the first request is bounded by the keep-alive timer, which runs
        # from the handshake until a whole request has arrived.
        config.ssl_handshake_timeout = limits.handshake_timeout_s
        config.keep_alive_timeout = min(
            config.keep_alive_timeout, limits.handshake_timeout_s
        )
    if keepalive is not None:
        config.websocket_ping_interval = keepalive.ping_interval_s
        config.relay_ping_missed_max = keepalive.ping_missed_max
    if tls_files is not None:
        config.certfile = str(tls_files[0])
        config.keyfile = str(tls_files[1])
        config.relay_ssl_context = ssl_context
    # Hypercorn's ASGI types and Starlette's describe the same protocol but are
    # distinct classes to mypy.
    asgi_app: Any = app
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn_serve, asgi_app, config, mode="asgi")
        )
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
