"""How a QMP session fails, kept apart from the watcher that reacts to it.

A failed connect becomes one bounded ``reason`` label; a command ends when QEMU has been silent
too long, not when a reply is merely late; a session that cannot go on raises `SessionLost`;
and reads run concurrently end together, so no task outlives its session.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from qemu.qmp import ConnectError

from exporter.qmp.readonly import ReadOnlyQMPClient
from exporter.runtime.fd_limit import FD_LIMIT

T = TypeVar("T")


class SessionLost(Exception):
    """The QMP session is unusable (timeout or disconnect); reconnect.

    ``closed``: QEMU closed the connection (the session ended) rather than the exporter giving
    up on it (timeout, protocol error)."""

    def __init__(self, message: str, *, closed: bool = False) -> None:
        super().__init__(message)
        self.closed = closed


def connect_error_reason(exc: BaseException) -> str:
    """Map a failed connect to a bounded `reason` label."""
    inner = exc.exc if isinstance(exc, ConnectError) else exc
    if isinstance(inner, FileNotFoundError):
        return "not_found"
    if isinstance(inner, ConnectionRefusedError):
        return "refused"
    if isinstance(inner, PermissionError):
        return "permission"
    if isinstance(inner, TimeoutError):
        return "timeout"
    if isinstance(inner, OSError) and inner.errno in (errno.EMFILE, errno.ENFILE):
        return FD_LIMIT  # this process's, or the system's, open-file limit (exporter.runtime.fd_limit)
    if isinstance(inner, EOFError | ConnectionResetError | BrokenPipeError):
        return "protocol"
    if isinstance(exc, ConnectError):  # greeting/negotiation errors wrap protocol problems
        return "protocol"
    return "other"


class SilenceWatchdog:
    """Fails ``reply`` with TimeoutError once QEMU has sent no line at all for ``timeout``
    seconds (see `exporter.qmp_watch.VMWatcher._cmd`).  One timer per command; a plain object
    rather than a closure, which would reference itself and leave cyclic garbage behind every
    command."""

    __slots__ = ("_client", "_handle", "_reply", "_seen", "_timeout")

    def __init__(self, client: ReadOnlyQMPClient, reply: asyncio.Future[object], timeout: float) -> None:
        self._client, self._reply, self._timeout = client, reply, timeout
        self._seen = client.lines_received
        self._handle = asyncio.get_running_loop().call_later(timeout, self._check)

    def _check(self) -> None:
        if self._reply.done():
            return
        if self._client.lines_received == self._seen:
            self._reply.set_exception(TimeoutError())
        else:
            self._seen = self._client.lines_received
            self._handle = asyncio.get_running_loop().call_later(self._timeout, self._check)

    def cancel(self) -> None:
        self._handle.cancel()  # also drops the handle's reference to us


async def gather(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently; results in order.  If one fails, the others are cancelled
    and awaited before the error propagates (no task outlives its session)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
