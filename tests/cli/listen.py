"""Listen flags that put all three broker listeners on free loopback ports."""

from __future__ import annotations

ALL_ON_PORT_ZERO = (
    "--device-listen",
    "127.0.0.1:0",
    "--engineer-listen",
    "127.0.0.1:0",
    "--metrics-listen",
    "127.0.0.1:0",
)
