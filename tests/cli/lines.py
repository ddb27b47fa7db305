"""Reading a child process's output with deadlines."""

from __future__ import annotations

import queue
import threading
from typing import IO


class LineReader:
    """Lines of a child's stream, copied by a daemon thread, then None at EOF.

    A blocking ``readline`` has no timeout; a queue read does, so every wait in
    the tests can fail with a message instead of hanging.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def get(self, timeout: float) -> str | None:
        """The next line, or None at EOF.

        Raises:
            queue.Empty: Nothing arrived within *timeout* seconds.
        """
        return self._queue.get(timeout=timeout)

    def join(self, timeout: float) -> None:
        """Wait for the copying thread to finish (after EOF)."""
        self._thread.join(timeout=timeout)
