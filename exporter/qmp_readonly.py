"""The read-only guarantee: the only place that decides what may be sent to QEMU.

The exporter watches production VMs; a stray ``cont``, ``stop`` or ``quit`` would change a
guest's fate.  So every outgoing QMP message, including the library's own capabilities
negotiation, passes `check_allowed` in `ReadOnlyQMPClient._cb_outbound`, the single outbound
hook of ``qemu.qmp``.  `ReadOnlyQMPClient.execute` checks first too, so a caller gets a clear
`ForbiddenCommand` instead of a torn-down connection.
"""

from __future__ import annotations

from collections.abc import Mapping

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


class ReadOnlyQMPClient(QMPClient):
    """A `QMPClient` that can only ever send `ALLOWED_COMMANDS`."""

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

    def _cb_inbound(self, msg: Message) -> Message:
        # The base hook formats every message for a debug log even when debug is off; with
        # event storms of tens of thousands of messages per second that is pure waste.
        return msg
