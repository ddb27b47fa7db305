"""Give the memory of closed connections back to the operating system.

Theory of operation
===================
The soak (``reliability/soak.py``) found the broker's resident size growing
with every session opened and closed, while its live heap stayed flat. Two
things combine:

* **Connections die in reference cycles.** trio's ``SSLStream`` keeps a handle
  on its own handshake method (so every TLS stream is a cycle), and Hypercorn's
  per-connection objects (protocol, task group, server) point at each other.
  Reference counting never frees a cycle; CPython's cyclic collector does, in
  its oldest generation, which in a heap of a hundred thousand long-lived
  objects runs only every few thousand connections. Until then each dead
  connection keeps its OpenSSL state and buffers, tens of KiB of C memory
  that ``tracemalloc`` does not see. Measured in the soak: about 20 MiB of
  such garbage built up between two automatic collections, then freed at once.
* **glibc keeps freed memory in the middle of its heap.** ``free`` returns
  memory to the kernel only from the top of the heap; the pages of chunks
  freed between live ones stay resident until ``malloc_trim`` releases them.
  A bulk free interleaved with long-lived allocations is the worst case.

So every ``memory_upkeep_s`` seconds the broker runs one full collection (on
the trio thread: the collector needs the interpreter, and a collection of the
broker's heap takes milliseconds because :func:`freeze_startup_objects` moves
everything created at start-up out of its reach) and then ``malloc_trim(0)``
in a worker thread (ctypes releases the GIL; the data plane keeps running).
With this, the soak's resident size levels off after the first minute instead
of climbing by 100-150 KiB per session.

Each run's duration and the objects collected are metrics
(``relay_memory_upkeep_seconds``, ``relay_gc_collected_objects_total``), so an
operator sees what it costs. ``malloc_trim`` exists only in glibc; elsewhere
(musl, macOS) the collection still runs and the trim is skipped.

The trim was not enough under glibc's malloc: at 500 devices its heap still
kept pages holding a live chunk among freed ones (resident +11 % over 15
minutes with a flat live heap). The broker is deployed on jemalloc
(``LD_PRELOAD``: the Containerfile, the systemd unit), which returns freed
pages by itself (its decay); there ``malloc_trim`` has next to nothing to
trim, and the collection still frees the cycles.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
from typing import Final

import trio

from relay.metrics import RelayMetrics

#: Passed to ``malloc_trim``: keep no slack at the top of the heap.
_TRIM_PAD: Final = 0


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def freeze_startup_objects() -> None:
    """Move everything alive now out of the cyclic collector's reach.

    Called once the broker is set up: modules, classes, configuration and
    caches live as long as the process, and scanning them in every full
    collection is what makes a collection of a big heap slow. Objects created
    afterwards (connections, sessions) are collected as usual.
    """
    gc.collect()
    gc.freeze()


async def run_memory_upkeep(
    interval_s: float,
    metrics: RelayMetrics,
    *,
    malloc_trim: Callable[[int], int] | None = None,
    load_trim: Callable[[], Callable[[int], int] | None] = _load_malloc_trim,
) -> None:
    """Collect cycles and trim the C heap every ``interval_s`` seconds, forever.

    ``interval_s`` 0 disables it (the task returns at once).
    """
    if interval_s <= 0:
        return
    trim = malloc_trim if malloc_trim is not None else load_trim()
    while True:
        await trio.sleep(interval_s)
        started = time.perf_counter()
        collected = gc.collect()
        if trim is not None:
            await trio.to_thread.run_sync(trim, _TRIM_PAD)
        metrics.memory_upkeep.observe(time.perf_counter() - started)
        metrics.gc_collected.inc(collected)
