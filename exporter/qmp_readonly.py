"""The read-only guarantee: the only place that decides what may be sent to QEMU.

The exporter watches production VMs; a stray ``cont``, ``stop`` or ``quit`` would change a
guest's fate.  So every outgoing QMP message, including the library's own capabilities
negotiation, passes `check_allowed` in `ReadOnlyQMPClient._cb_outbound`, the single outbound
hook of ``qemu.qmp``.  `ReadOnlyQMPClient.execute` checks first too, so a caller gets a clear
`ForbiddenCommand` instead of a torn-down connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.message import Message

#: Commands the exporter needs, all free of side effects.  Nothing else is ever sent.
ALLOWED_COMMANDS: frozenset[str] = frozenset(
    {
        "qmp_capabilities",
        "query-name",
        "query-uuid",
        "query-version",
        "query-status",
        "query-block",
        "query-blockstats",
        "qom-get",
        "qom-list",
        "device-list-properties",
    }
)


class ForbiddenCommand(Exception):
    """Raised instead of sending a command that is not on the read-only allowlist."""

    def __init__(self, command: object) -> None:
        super().__init__(f"refusing to send QMP command {command!r}: not on the read-only allowlist")
        self.command = command


def check_allowed(msg: Mapping[str, object]) -> None:
    """Raise `ForbiddenCommand` unless ``msg`` executes an allowlisted command."""
    command = msg.get("execute", msg.get("exec-oob"))
    if command not in ALLOWED_COMMANDS or "exec-oob" in msg:
        raise ForbiddenCommand(command)


#: How long a closed connection's buffered lines may take to be read before the reader is cut.
_DRAIN_SECONDS = 5.0

#: What marks a QMP event line; a line without it cannot be an event.
_EVENT_KEY = b'"event"'


class ReadOnlyQMPClient(QMPClient):
    """A `QMPClient` that can only ever send `ALLOWED_COMMANDS`.

    With ``on_event``, every QMP event is passed to it as a plain dict, synchronously and in
    order, from the reader task: no `Message` object, no `EventListener` queue and no task
    switch per event (an event storm is tens of thousands of events a second); nor does the
    library's default listener (``self.events``) see them, which would keep every event for the
    life of the session.  Replies to commands take the library's usual path.
    """

    def __init__(
        self, name: str | None = None, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        super().__init__(name)
        self._on_event_cb = on_event

    async def _bh_recv_message(self) -> None:
        msg_bytes = await self._readline()
        handler = self._on_event_cb
        if handler is not None and _EVENT_KEY in msg_bytes:
            try:
                obj = json.loads(msg_bytes)
            except ValueError:
                obj = None  # not JSON: the library's path below reports it as it always did
            if isinstance(obj, dict) and "event" in obj:  # how qemu.qmp routes events, too
                handler(obj)
                return
        msg = self._cb_inbound(Message(msg_bytes, eager=True))
        await self._on_message(msg)

    async def execute(
        self, cmd: str, arguments: Mapping[str, object] | None = None, oob: bool = False
    ) -> object:
        msg: dict[str, object] = {"exec-oob" if oob else "execute": cmd}
        check_allowed(msg)
        return await super().execute(cmd, arguments, oob=oob)

    def _cb_outbound(self, msg: Message) -> Message:
        # Last line of defence for anything that bypasses execute() (e.g. _raw): raising here
        # fails the writer task, which drops the connection rather than send the command.
        check_allowed(msg)
        return msg

    async def _bh_disconnect(self) -> None:
        # When the writer failed because QEMU closed the connection, the reader may still hold
        # QEMU's last lines (an event storm) in its buffer; the library would cancel it at once
        # and lose them.  Let it drain to EOF first, for a bounded time.
        reader, writer = self._reader_task, self._writer_task
        if reader is not None and writer is not None and writer.done() and not reader.done():
            await asyncio.wait({reader}, timeout=_DRAIN_SECONDS)
        await super()._bh_disconnect()

    def _cb_inbound(self, msg: Message) -> Message:
        # The base hook formats every message for a debug log even when debug is off; with
        # event storms of tens of thousands of messages per second that is pure waste.
        return msg
