"""The read-only guarantee: the only place that decides what may be sent to QEMU.

The exporter watches production VMs; a stray ``cont``, ``stop`` or ``quit`` would change a
guest's fate.  A message can leave by two doors, and `check_allowed` guards both:

* the library's path (capabilities negotiation, `ReadOnlyQMPClient.execute`): every message
  passes ``qemu.qmp``'s single outbound hook, `ReadOnlyQMPClient._cb_outbound`;
* the query path the watcher uses (`ReadOnlyQMPClient.query`), which writes the command itself
  and checks it before anything is written.

Both raise `ForbiddenCommand` rather than send.

It is also the one module that uses qemu.qmp's private parts (contract:
tests/unit/test_qmp_contract.py): the reader's bottom half ``_bh_recv_message``, the
connection's ``_reader``/``_writer``, and ``_on_message`` for what it does not own.  Why: at
1000 VMs x 4 disks in an event storm, the library's path cost the exporter ~22 us of CPU per
event (a `Message`, two queues and a task switch per event: round 1), then 14.1 us with events
parsed once but still read a line at a time (an await and a buffer search per line, a yield
every 8 lines; 13.3 us in the final A/B runs), 10.8 us reading a chunk per wake-up with orjson,
10.1 us with the rest of round 3.  The simplest loop that reads and decodes the same sockets'
events costs 4.4-5.4 us/event on the same machine (bench/floor.py; docs/performance.md, round
3).  Greeting, negotiation and disconnect stay the library's.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import termios
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, Runstate
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse
from qemu.qmp.qmp_client import BadReplyError

from exporter.fairness import ScrapeFirst

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

#: The longest line QEMU may send (the library's default is 10 MiB).  The read buffer of a
#: connection fills up to twice this before reading pauses and the backlog waits in the socket,
#: which is what an event storm the exporter cannot keep up with does to every connection at
#: once.  The largest reply read here, query-block or query-blockstats of a VM with a hundred
#: disks, is a few hundred KiB.
READ_BUFFER_BYTES = 1024 * 1024

#: Bytes a reader takes from its buffer at a time, and between two turns of the loop while it
#: has a backlog.  In a storm the exporter keeps up with, a reader finds only what arrived
#: during one turn (less than this); with a backlog at 1000 VMs a turn is ~1000 x this many
#: bytes (~18 events of ~230 B) x ~6 us, ~0.1 s, which a scrape needs a couple of before its
#: handler runs (readers then wait: `exporter.fairness`).  Line by line (qemu.qmp's readline,
#: an await per line, a yield every 8 lines) the exporter spent 14.1 us/event, 10.8 with
#: chunks (docs/performance.md, round 3).
READ_CHUNK = 4096

#: json.dumps with non-default separators builds an encoder per call; every command is encoded.
_encode = json.JSONEncoder(separators=(",", ":")).encode

#: Prefix of the ids `ReadOnlyQMPClient.query` gives its commands (the library uses ``__qmp#``).
_QUERY_ID = "ro#"


class ReadOnlyQMPClient(QMPClient):
    """A `QMPClient` that can only ever send `ALLOWED_COMMANDS`, with a cheap path for the
    exporter's traffic.

    With ``on_event``, every QMP event is passed to it as a plain dict, synchronously and in
    order, from the reader task: no `Message` object, no `EventListener` queue and no task
    switch per event (an event storm is tens of thousands of events a second); nor does the
    library's default listener (``self.events``) see them, which would keep every event for the
    life of the session.

    `query` is the same idea for commands.  The library's ``execute`` costs, per command, a
    `Message` each way, two queue hand-offs (outgoing queue and writer task, reply queue) and
    several task switches: at 1000 VMs x 28 commands that was most of the exporter's CPU while
    the fleet connects.  `query` writes the command at once and returns a future that the reader
    resolves when the reply comes, parsed once.  Everything else — greeting, negotiation,
    disconnect, and any reply the query path does not own — stays the library's.
    """

    def __init__(
        self,
        name: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        scrape_first: ScrapeFirst | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name, readbuflen=READ_BUFFER_BYTES)
        self._on_event_cb = on_event
        self._scrape_first = scrape_first
        self._clock = clock
        self._queries: dict[
            str, tuple[dict[str, object], asyncio.Future[object], Callable[[object], None] | None]
        ] = {}
        self._query_seq = 0
        #: Lines received from QEMU so far: proof of life while a reply is awaited.
        self.lines_received = 0
        # Reader state (`_bh_recv_message`): the start of a line not complete yet, whether
        # the last read filled its chunk (more may be buffered), whether the reader is blocked
        # waiting for data, and the time up to which the stream is known to be handled.
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._backlog = False
        self._waiting = False
        self._through = clock()
        self._fd: int | None = None  # the socket's, cached by read_through

    def query(
        self,
        cmd: str,
        arguments: Mapping[str, object] | None = None,
        on_reply: Callable[[object], None] | None = None,
    ) -> asyncio.Future[object]:
        """Send ``cmd`` now; the future resolves to its ``return`` value.

        ``on_reply`` is called with that value by the reader, synchronously, at the reply's
        place in QEMU's stream: before any event QEMU wrote after it is handled (the awaiting
        task resumes later, after the reader may have handled many more lines).  If it raises,
        the future fails with that error.

        It fails with `ExecuteError` when QEMU answers with an error, `BadReplyError` when the
        reply is malformed, `ExecInterruptedError` when the session ends first; `ForbiddenCommand`
        and `ExecInterruptedError` (no session) are raised here, before anything is sent.
        Cancelling the future abandons the reply, which is then dropped when it comes.
        """
        msg: dict[str, object] = {"execute": cmd}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        check_allowed(msg)
        writer = self._writer
        if self.runstate != Runstate.RUNNING or writer is None or writer.is_closing():
            raise ExecInterruptedError("not connected")
        self._query_seq += 1
        qid = f"{_QUERY_ID}{self._query_seq}"
        msg["id"] = qid
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queries[qid] = (msg, fut, on_reply)
        writer.write(_encode(msg).encode())
        return fut

    def fileno(self) -> int | None:
        """The connection's socket fd, None when not connected: `exporter.liveness` asks the
        kernel how many bytes wait unread on it (with `lines_received` as the reader's
        progress) to notice a reader that has stopped while QEMU queues events for it."""
        writer = self._writer
        sock = writer.get_extra_info("socket") if writer is not None else None
        return sock.fileno() if sock is not None else None

    def _resolve_query(self, obj: dict[str, Any]) -> bool:
        """Hand a reply to the `query` that owns its id; False if none does."""
        qid = obj.get("id")
        entry = self._queries.pop(qid, None) if isinstance(qid, str) else None
        if entry is None:
            return False
        sent, fut, on_reply = entry
        if fut.done():  # abandoned by its caller
            return True
        if "error" in obj:
            try:
                fut.set_exception(ExecuteError(ErrorResponse(obj), Message(sent), Message(obj)))
            except (KeyError, TypeError):
                fut.set_exception(BadReplyError("QMP error reply is malformed", Message(obj), Message(sent)))
        elif "return" in obj:
            if on_reply is not None:
                try:
                    on_reply(obj["return"])
                except Exception as exc:
                    fut.set_exception(exc)
                    return True
            fut.set_result(obj["return"])
        else:
            fut.set_exception(
                BadReplyError(
                    "QMP reply is missing a 'error' or 'return' member", Message(obj), Message(sent)
                )
            )
        return True

    def read_through(self, now: float) -> float:
        """The time up to which this session's stream is known to be read and handled: ``now``
        while the reader waits for data with nothing unread (its buffer empty, nothing in the
        kernel socket buffer), else the last time it had handled everything it had received.

        Hang tracking advances a VM's trackers only this far (`exporter.hang.tracking`): being
        behind in reading a storm must not look like silence, and silence ends a hang.  Data
        that reached the socket during the current turn of the loop before the reader emptied
        its buffer is not seen here (at most one turn, well under the 1 s default margin of a hang)."""
        if self._waiting and not self._partial:
            if self._fd is None:
                self._fd = self.fileno()  # once per connection: read at every tick and scrape
            if self._fd is None or _unread(self._fd) == 0:
                return now
        return min(now, self._through)

    async def _bh_recv_message(self) -> None:
        """Read what is buffered (up to a chunk), then handle every complete line in it.

        One call per chunk, not per line: qemu.qmp's ``readline`` costs an await and a
        buffer search per line.  Lines are decoded with orjson (stdlib json if orjson refuses,
        e.g. NaN or an integer beyond 64 bits), events go to ``on_event`` and replies to
        `query` synchronously, in stream order; anything else takes the library's path."""
        reader = self._reader
        assert reader is not None
        scrape = self._scrape_first
        if self._backlog:
            # The last read filled its chunk: more is buffered, and handling it without a yield
            # would hold the loop for this connection's whole backlog (exporter.fairness).  While
            # a scrape is served, a reader with a backlog waits for it to be written.
            if scrape is not None and scrape.active():
                await scrape.served()  # the events wait in the socket meanwhile
            else:
                await asyncio.sleep(0)
        size = READ_CHUNK
        self._waiting = True
        try:
            data = await reader.read(size)
        finally:
            self._waiting = False
        if not data:
            if self._partial:  # QEMU's last line, cut by the end of the stream
                line = b"".join(self._partial)
                self._partial, self._partial_len = [], 0
                self.lines_received += 1
                await self._handle_lines([line])
            raise EOFError
        drained = len(data) < size
        got = self._clock()
        lines = data.split(b"\n")
        tail = lines.pop()
        if self._partial and lines:
            self._partial.append(lines[0])
            lines[0] = b"".join(self._partial)
            self._partial, self._partial_len = [], 0
        if tail:
            self._partial.append(tail)
            self._partial_len += len(tail)
            if self._partial_len > READ_BUFFER_BYTES:
                raise ValueError(f"QMP line longer than {READ_BUFFER_BYTES} bytes")
        self._backlog = not drained
        self.lines_received += len(lines)
        await self._handle_lines(lines)
        if drained and not self._partial:
            self._through = got

    async def _handle_lines(self, lines: list[bytes]) -> None:
        handler = self._on_event_cb
        resolve = self._resolve_query
        loads = orjson.loads
        for line in lines:
            try:
                obj = loads(line)
            except orjson.JSONDecodeError:
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None  # not JSON: the library's path below reports it as it always did
            if type(obj) is dict:
                if "event" in obj:  # how qemu.qmp routes events, too
                    if handler is not None:
                        handler(obj)
                        continue
                elif resolve(obj):
                    continue
            msg = self._cb_inbound(Message(line, eager=True))
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
        try:
            await super()._bh_disconnect()
        finally:
            queries, self._queries = self._queries, {}
            for _sent, fut, _on_reply in queries.values():
                if not fut.done():
                    fut.set_exception(ExecInterruptedError("Disconnected"))

    def _cb_inbound(self, msg: Message) -> Message:
        # The base hook formats every message for a debug log even when debug is off; with
        # event storms of tens of thousands of messages per second that is pure waste.
        return msg


#: `_unread`'s ioctl buffer: one for all (the event loop's thread only).
_FIONREAD_BUF = array.array("i", [0])


def _unread(fd: int) -> int:
    """`exporter.liveness.fionread` without an allocation: `ReadOnlyQMPClient.read_through`
    asks it for every VM at every tick and scrape (2.5 % of the exporter's CPU in a storm)."""
    try:
        fcntl.ioctl(fd, termios.FIONREAD, _FIONREAD_BUF)
    except OSError:
        return 0
    return _FIONREAD_BUF[0]
