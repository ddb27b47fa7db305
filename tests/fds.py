"""This process's open sockets, for leak checks around a session.

Leak checks count sockets rather than every descriptor: the store's connection
pool may grow by a connection (and its SQLite and WAL files) when two worker
threads ask at once, which is not a leak, while a socket left open after a
session has ended always is.
"""

from __future__ import annotations

import os


def open_sockets() -> set[int]:
    """The descriptors of this process that are sockets (the broker runs in it too)."""
    sockets = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # closed between listing and reading
            continue
        if target.startswith("socket:"):
            sockets.add(int(name))
    return sockets
