"""Echo throughput of our WebSocket transport against trio-websocket, side by side.

A first, small measurement for the transport (the benchmark stage builds the full
suite in bench/). One process, TLS on loopback, one connection: the client
pipelines N messages of SIZE bytes to an echo server and reads them back. Each
server implementation is measured with the same client (ours) in the same run, so
the ratio is what matters, not the absolute figure.

    .venv/bin/python bench/transport_echo.py [--size 65536] [--count 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import ssl
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
import trio_websocket
from cryptography.hazmat.primitives import serialization

import auth
from relay._trio.websocket import ConnectionClosed, ServerHandshake, connect_websocket
from relay.config import WebSocketLimits


def _tls_files(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    now = datetime.now(UTC)
    ca = auth.create_ca(common_name="bench CA", now=now, lifetime=timedelta(days=1))
    key, certificate = auth.issue_server_certificate(
        ca, names=["localhost"], now=now, lifetime=timedelta(days=1)
    )
    (directory / "cert.pem").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
    )
    (directory / "key.pem").write_bytes(auth.private_key_pem(key))
    (directory / "ca.pem").write_bytes(ca.certificate_pem())
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    client = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    return server, client


async def _serve_ours(
    server_ctx: ssl.SSLContext,
    limits: WebSocketLimits,
    task_status: trio.TaskStatus[int],
) -> None:
    async def handler(tcp: trio.SocketStream) -> None:
        tls = trio.SSLStream(tcp, server_ctx, server_side=True, https_compatible=True)
        await tls.do_handshake()
        handshake = ServerHandshake(tls, limits)
        request = await handshake.receive_request()
        async with handshake.accept(request) as ws:
            try:
                while True:
                    await ws.send_message(await ws.receive_message())
            except ConnectionClosed:
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def _serve_trio_websocket(
    server_ctx: ssl.SSLContext,
    limits: WebSocketLimits,
    task_status: trio.TaskStatus[int],
) -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                handler,
                "127.0.0.1",
                0,
                server_ctx,
                max_message_size=limits.max_message_bytes,
                receive_buffer_size=65536,  # the tuned setting from the stack report
                task_status=task_status,
            )
        )
        task_status.started(server.port)


async def _run_client(
    port: int,
    client_ctx: ssl.SSLContext,
    limits: WebSocketLimits,
    size: int,
    count: int,
) -> float:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(
        tcp, client_ctx, server_hostname="localhost", https_compatible=True
    )
    await tls.do_handshake()
    payload = b"x" * size
    async with connect_websocket(tls, f"wss://localhost:{port}/echo", limits) as ws:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:

            async def sender() -> None:
                for _ in range(count):
                    await ws.send_message(payload)

            nursery.start_soon(sender)
            for _ in range(count):
                await ws.receive_message()
        return time.perf_counter() - start


async def main(size: int, count: int) -> dict[str, object]:
    limits = WebSocketLimits(max_message_bytes=max(size, 1024))
    with tempfile.TemporaryDirectory() as tmp:
        server_ctx, client_ctx = _tls_files(Path(tmp))
        rates: dict[str, dict[str, float]] = {}
        for name, serve in (
            ("ours", _serve_ours),
            ("trio-websocket", _serve_trio_websocket),
        ):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve, server_ctx, limits)
                elapsed = await _run_client(port, client_ctx, limits, size, count)
                nursery.cancel_scope.cancel()
            rates[name] = {
                "seconds": round(elapsed, 3),
                "messages_per_s": round(count / elapsed),
                "echo_mb_per_s": round(2 * size * count / elapsed / 1e6, 1),
            }
    ratio = rates["ours"]["messages_per_s"] / rates["trio-websocket"]["messages_per_s"]
    return {
        **rates,
        "ratio_ours_over_trio_websocket": round(ratio, 2),
        "setup": {
            "size": size,
            "count": count,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(trio.run(main, args.size, args.count), indent=2))
