"""The agent's shell channel: a real command on a real PTY."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from relay._trio.pty_process import PtyProcess, open_pty_process

SHELL = ["/bin/sh"]
ENV = {"PATH": "/usr/bin:/bin", "TERM": "xterm-256color", "PS1": "$ "}


async def _read_until(
    process: PtyProcess, marker: bytes, *, timeout_s: float = 5.0
) -> bytes:
    seen = b""
    with trio.fail_after(timeout_s):
        while marker not in seen:
            chunk = await process.receive_some()
            if not chunk:
                break
            seen += chunk
    return seen


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_shell_sees_the_size_and_a_resize() -> None:
    """The command runs on a terminal of the given size; resize reaches it."""
    async with open_pty_process(SHELL, cols=100, rows=30, env=ENV) as process:
        # $((...)) is expanded in the output only, never in the echoed command.
        await process.send_all(b"stty size; echo END$((40+1))\n")
        assert b"30 100" in await _read_until(process, b"END41\r\n")
        process.resize(120, 40)
        await process.send_all(b"stty size; echo END$((40+2))\n")
        assert b"40 120" in await _read_until(process, b"END42\r\n")


async def test_command_exit_ends_the_stream() -> None:
    """When the command exits, reads answer b'' (not EIO) and the exit is reaped."""
    async with open_pty_process(
        ["/bin/sh", "-c", "echo bye"], cols=80, rows=24, env=ENV
    ) as process:
        output = await _read_until(process, b"\x00never")
        assert b"bye" in output
        with trio.fail_after(5):
            assert await process.process.wait() == 0


async def test_leaving_the_block_kills_the_whole_group() -> None:
    """A command and the child it started are gone after the block, even one that
    ignores SIGHUP and SIGTERM."""
    script = "trap '' HUP TERM; sleep 300 & echo child=$!; wait"
    async with open_pty_process(
        ["/bin/sh", "-c", script], cols=80, rows=24, env=ENV, kill_grace_s=0.2
    ) as process:
        output = await _read_until(process, b"\r\n")
        child = int(output.split(b"child=")[1].split(b"\r\n")[0])
        pid = process.pid
        assert _alive(child)
    assert process.process.returncode == -signal.SIGKILL
    assert not _alive(pid)
    with trio.fail_after(5):
        while _alive(child):  # noqa: ASYNC110 - another process, nothing to wait on
            await trio.sleep(0.02)


async def test_no_fd_is_left_behind() -> None:
    """The master and slave fds are closed after the block."""
    before = len(os.listdir("/proc/self/fd"))
    async with open_pty_process(SHELL, cols=80, rows=24, env=ENV) as process:
        assert len(os.listdir("/proc/self/fd")) > before
        await process.send_all(b"exit\n")
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(("cols", "rows"), [(0, 24), (80, 0), (1001, 24), (80, 1001)])
async def test_bad_sizes_are_refused(cols: int, rows: int) -> None:
    """Sizes outside 1..1000 are refused before anything starts, and on resize."""
    with pytest.raises(ValueError, match=r"must be in 1\.\.1000"):
        async with open_pty_process(SHELL, cols=cols, rows=rows, env=ENV):
            pass
    async with open_pty_process(SHELL, cols=80, rows=24, env=ENV) as process:
        with pytest.raises(ValueError, match=r"must be in 1\.\.1000"):
            process.resize(cols, rows)


async def test_missing_command_is_an_os_error_and_leaks_nothing() -> None:
    """A command that does not exist fails to start; no fd stays open."""
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        async with open_pty_process(["/nonexistent/shell"], cols=80, rows=24):
            pass
    assert len(os.listdir("/proc/self/fd")) == before
