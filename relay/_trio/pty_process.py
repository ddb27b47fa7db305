"""A command on a pseudo-terminal, as a trio stream: the agent's ``shell`` channel.

Theory of operation
===================
:func:`open_pty_process` opens a PTY pair, starts the command in a new session
with the PTY's slave side as its controlling terminal and stdin/stdout/stderr,
closes the slave in the agent, and yields a :class:`PtyProcess` whose ``stream``
is the master side (a ``trio.lowlevel.FdStream``): bytes written there are typed
into the terminal, bytes read are what the terminal shows.

When the command exits, the kernel answers reads on the master with EIO instead of
an end of file; :meth:`PtyProcess.receive_some` turns that into ``b""``, so the
stream ends like any other.

Ending is forceful and bounded, since a remote session can be ended at any moment
(Invariant: the person at the instrument ends it, the tunnel is gone): on leaving
the ``async with`` the master is closed (the terminal hangs up, which sends SIGHUP
to the session's foreground group), the whole process group gets SIGHUP and
SIGTERM, and anything still alive after ``kill_grace_s`` gets SIGKILL; the child is
always reaped. No fd, process or task outlives the block.

Rule 1: the slave fd never stays open in the agent (the master would never see
        the hang-up otherwise).
Rule 2: signals go to the process group (the command's children too), never to
        a reused pid: the group is signalled only while the child is unreaped.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import signal
import struct
import termios
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Final

import trio

__all__ = ["MAX_TERMINAL_SIZE", "PtyProcess", "open_pty_process"]

#: Largest number of columns or rows accepted for a terminal.
MAX_TERMINAL_SIZE: Final = 1000
_READ_BYTES: Final = 32 * 1024


def _take_controlling_terminal() -> None:
    # Runs in the child after setsid() (start_new_session): stdin is the slave.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyProcess:
    """A running command on a PTY; create it with :func:`open_pty_process`."""

    def __init__(self, process: trio.Process, master_fd: int) -> None:
        self.process = process
        self._master_fd = master_fd
        self.stream: Final = trio.lowlevel.FdStream(master_fd)

    @property
    def pid(self) -> int:
        """The command's process id (also its process group id)."""
        return self.process.pid

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size; the command gets SIGWINCH.

        Raises:
            ValueError: *cols* or *rows* outside 1..:data:`MAX_TERMINAL_SIZE`.
        """
        for name, value in (("cols", cols), ("rows", rows)):
            if not 1 <= value <= MAX_TERMINAL_SIZE:
                raise ValueError(f"{name} must be in 1..{MAX_TERMINAL_SIZE}")
        _set_size(self._master_fd, cols, rows)

    async def send_all(self, data: bytes) -> None:
        """Type *data* into the terminal."""
        await self.stream.send_all(data)

    async def receive_some(self, max_bytes: int = _READ_BYTES) -> bytes:
        """What the terminal shows next; ``b""`` once the command has exited."""
        try:
            return await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EIO:
                return b""
            raise
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@asynccontextmanager
async def open_pty_process(
    argv: Sequence[str],
    *,
    cols: int,
    rows: int,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    kill_grace_s: float = 1.0,
) -> AsyncIterator[PtyProcess]:
    """Run *argv* on a new PTY of *cols* x *rows* for the length of the block.

    Raises:
        ValueError: A bad terminal size or an empty *argv*.
        OSError: The command cannot be started (not found, not executable).
    """
    if not argv:
        raise ValueError("argv must name a command")
    for name, value in (("cols", cols), ("rows", rows)):
        if not 1 <= value <= MAX_TERMINAL_SIZE:
            raise ValueError(f"{name} must be in 1..{MAX_TERMINAL_SIZE}")
    master_fd, slave_fd = pty.openpty()
    try:
        _set_size(master_fd, cols, rows)
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=slave_fd,
            stdout=slave_fd,
            stderr=slave_fd,
            start_new_session=True,
            preexec_fn=_take_controlling_terminal,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except BaseException:
        os.close(master_fd)
        raise
    finally:
        os.close(slave_fd)  # Rule 1
    pty_process = PtyProcess(process, master_fd)
    try:
        yield pty_process
    finally:
        with trio.CancelScope(shield=True):
            await _end(pty_process, kill_grace_s)


async def _end(pty_process: PtyProcess, kill_grace_s: float) -> None:
    await pty_process.stream.aclose()  # hang-up: SIGHUP to the foreground group
    process = pty_process.process
    if process.returncode is None:
        _signal_group(process, signal.SIGHUP)
        _signal_group(process, signal.SIGTERM)
        with trio.move_on_after(kill_grace_s):
            await process.wait()
    if process.returncode is None:
        _signal_group(process, signal.SIGKILL)
    await process.wait()


def _signal_group(process: trio.Process, signum: int) -> None:
    # Rule 2: only while the child is unreaped is its pid (= its group id) ours.
    if process.returncode is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
