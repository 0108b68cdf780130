"""The read-only guarantee: the only place that decides what may be sent to QEMU.

The exporter watches production VMs; a stray ``cont``, ``stop`` or ``quit`` would change a
guest's fate.  A message can leave by two doors, and `check_allowed` guards both:

* the library's path (capabilities negotiation, `ReadOnlyQMPClient.execute`): every message
  passes ``qemu.qmp``'s single outbound hook, `ReadOnlyQMPClient._cb_outbound`;
* the query path the watcher uses (`ReadOnlyQMPClient.query`), which writes the command itself
  and checks it before anything is written.

Both raise `ForbiddenCommand` rather than send.

It is also the one module that uses qemu.qmp's private parts (contract:
tests/unit/test_qmp_contract.py): ``_establish_session`` (where it puts its own protocol,
`_Stream`, on the connection), the reader's bottom half ``_bh_recv_message``, the connection's
``_reader``/``_writer``, and ``_on_message`` for what it does not own.  Why: at 1000 VMs x 4
disks in an event storm, the library's path cost the exporter ~22 us of CPU per event (a
`Message`, two queues and a task switch per event), then 14.1 us with events parsed once but
still read a line at a time (an await and a buffer search per line, a yield every 8 lines;
13.3 us in the final A/B runs), 10.8 us reading a chunk per wake-up with orjson, 10.1 us with
less work per event.  The simplest loop that reads and decodes the same sockets' events costs
4.4-5.4 us/event on the same machine (bench/floor.py).  The data is handled in the transport's
callback, without waking the reader task: a wake-up was an epoll event, a future and a task step
per read, for the one or two events a VM sends per turn of the loop at 20,000 events/s (the
reader alone: 28.1 -> 8.9 us/event, bench/reader_cost.py).  See "the reader" in
`ReadOnlyQMPClient`; every step measured: docs/performance-history.md.  Greeting, negotiation
and disconnect stay the library's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, Runstate
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse
from qemu.qmp.qmp_client import BadReplyError

from exporter.runtime.fairness import ScrapeFirst
from exporter.runtime.fionread import fionread

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

#: The longest line QEMU may send (the library's default is 10 MiB).  The backlog of a
#: connection (received, not handled yet) fills up to twice this before reading pauses and the
#: rest waits in the socket, which is what an event storm the exporter cannot keep up with does
#: to every connection at once.  The largest reply read here, query-block or query-blockstats of a VM with a hundred
#: disks, is a few hundred KiB.
READ_BUFFER_BYTES = 1024 * 1024

#: The most a reader handles in the transport's callback, and then between two turns of the
#: loop while it has a backlog (more than this arrived at once).  In a storm the exporter keeps
#: up with, a reader finds only what arrived during one turn (less than this); with a backlog at
#: 1000 VMs a turn is ~1000 x this many bytes (~18 events of ~230 B) x ~6 us, ~0.1 s, which a
#: scrape needs a couple of before its handler runs (readers with a backlog then wait:
#: `exporter.runtime.fairness`).  Line by line (qemu.qmp's readline, an await per line, a yield every 8
#: lines) the exporter spent 14.1 us/event, 10.8 with chunks (docs/performance-history.md).
READ_CHUNK = 4096

#: json.dumps with non-default separators builds an encoder per call; every command is encoded.
_encode = json.JSONEncoder(separators=(",", ":")).encode

#: Prefix of the ids `ReadOnlyQMPClient.query` gives its commands (the library uses ``__qmp#``).
_QUERY_ID = "ro#"


class ReadOnlyQMPClient(QMPClient):
    """A `QMPClient` that can only ever send `ALLOWED_COMMANDS`, with a cheap path for the
    exporter's traffic.

    With ``on_event``, every QMP event is passed to it as a plain dict, synchronously and in
    order, from the transport's data callback (or the reader task): no `Message` object, no
    `EventListener` queue and no task switch per event (an event storm is tens of thousands of events a second); nor does the
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
        self._reset_reader()

    def _reset_reader(self) -> None:
        """The reader's state for a new connection (see "the reader" below)."""
        self._stream: _Stream | None = None
        self._transport: asyncio.Transport | None = None
        # The start of a line not complete yet.
        self._partial: list[bytes] = []
        self._partial_len = 0
        # Whether `_received` handles data itself (else the reader task has work in hand, or
        # the reader is not attached yet or any more); whether the reader waits for data with
        # everything received handled; the time up to which the stream is known to be handled.
        self._direct = False
        self._waiting = False
        self._through = self._clock()
        # What the reader task has in hand: lines split but not handled, bytes received but
        # not split, the end of the stream (and its error), a failure of `_received`.
        self._held: list[bytes] = []
        self._backlog = bytearray()
        self._paused = False  # reading paused for the size of `_backlog`
        self._at_end = False
        self._end_error: BaseException | None = None
        self._failure: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None  # the task waits on it while `_direct`
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
        """The connection's socket fd, None when not connected: `exporter.runtime.liveness` asks the
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
        while the reader waits for data with nothing unread (nothing received and not handled,
        nothing in the kernel socket buffer), else the last time it had handled everything it
        had received.

        Hang tracking advances a VM's trackers only this far (`exporter.hang.tracking`): being
        behind in reading a storm must not look like silence, and silence ends a hang.  Data
        that reached the socket during the current turn of the loop before the reader emptied
        its buffer is not seen here (at most one turn, well under the 1 s default margin of a hang)."""
        if self._waiting and not self._partial:
            if self._fd is None:
                self._fd = self.fileno()  # once per connection: read at every tick and scrape
            if self._fd is None or fionread(self._fd) == 0:
                return now
        return min(now, self._through)

    # -- the reader ------------------------------------------------------------------------
    #
    # Greeting and negotiation are read by the library through the connection's StreamReader.
    # From then on the connection's protocol (`_Stream`, installed before the greeting) hands
    # what it receives to `_received`, which handles it in the transport's callback: split into
    # lines, decoded, events and query replies passed on synchronously.  The reader task (the
    # library's, running `_bh_recv_message`) only steps in for what cannot be done there: a
    # message for the library's path (a coroutine), a backlog (more than a chunk received at
    # once: a chunk per turn of the loop, waiting while a scrape is served), and the end.

    def _install_stream(self) -> None:
        """Put `_Stream` between the transport and asyncio's StreamReaderProtocol (which it
        feeds until `_attach`)."""
        writer = self._writer
        assert writer is not None
        transport = writer.transport
        inner = transport.get_protocol()
        assert isinstance(transport, asyncio.Transport) and isinstance(inner, asyncio.Protocol)
        self._transport = transport
        self._stream = _Stream(inner)
        transport.set_protocol(self._stream)

    async def _attach(self) -> None:
        """Take over from the StreamReader: what it holds beyond the negotiation is the start
        of the stream; everything received from now on comes to `_received`."""
        reader, stream = self._reader, self._stream
        assert reader is not None and stream is not None
        ended = stream.attach(self._received, self._stream_ended)
        if not ended:
            reader.feed_eof()  # nothing more reaches it: read() returns what it holds, at once
        rest = await reader.read()  # raises what ended the connection, as the library's reader did
        if ended:
            self._at_end = True
        self._backlog[:0] = rest  # before anything received meanwhile (nothing: no await above yields)

    def _received(self, nbytes: int) -> None:
        """`_Stream.buffer_updated`: ``nbytes`` arrived in `_READ_VIEW`.  Handled here, with
        no task switch, unless the reader task has work in hand, more than a chunk came, or a
        scrape is being served.

        During a scrape the reader task handles it, at its turn (not waiting for the scrape:
        that is only for readers that are behind).  Handled here, every VM's events would be
        handled in the turn's I/O callbacks, among them the scrape's: its response's writes
        waited behind the handling of everything that arrived while the page was rendered (at
        60,000 events/s, in-storm scrapes took ~50 ms longer, docs/performance-history.md)."""
        if not self._direct:
            self._backlog += _READ_VIEW[:nbytes]
            if len(self._backlog) > 2 * READ_BUFFER_BYTES and not self._paused:
                self._paused = True  # the backlog waits in the socket (and in QEMU)
                self._pause_reading()
            return
        scrape = self._scrape_first
        if nbytes > READ_CHUNK or (scrape is not None and scrape.active()):
            self._backlog += _READ_VIEW[:nbytes]
            self._to_task()
            return
        self._waiting = False
        got = self._clock()
        try:
            lines = self._split(bytes(_READ_VIEW[:nbytes]))
            done = self._dispatch(lines)
        except Exception as exc:  # a line too long, or a bug: the reader ends, as it did
            self._fail(exc)
            return
        if done < len(lines):
            self._held = lines[done:]
            self._to_task()
            return
        if not self._partial:
            self._through = got
        self._waiting = True

    def _stream_ended(self, exc: BaseException | None) -> None:
        """`_Stream`: end of file (None) or the connection lost (its error, if any)."""
        self._at_end = True
        if exc is not None and self._end_error is None:
            self._end_error = exc
        self._to_task()

    def _to_task(self) -> None:
        self._direct = False
        self._waiting = False
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._pause_reading()
        self._to_task()

    def _pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    async def _bh_recv_message(self) -> None:
        """The reader task: attach to the stream, then do what `_received` cannot, until the
        stream ends (`EOFError`, as the library's reader) or the task is cancelled."""
        if self._stream is None:
            raise RuntimeError("no stream installed")  # _establish_session installs it
        try:
            # First let connect() return: it checks that the session is still running after the
            # library started this task, and QEMU's last lines and the end of the stream may
            # already be buffered; handled at once, the session would end before connect()
            # returned, and it would fail (the events handed on lost with it).
            await asyncio.sleep(0)
            await self._attach()
            loop = asyncio.get_running_loop()
            while True:
                await self._drain()
                if self._direct:
                    self._wake = loop.create_future()
                    await self._wake
                    self._wake = None
        finally:
            self._detach()

    async def _drain(self) -> None:
        """Handle what `_received` left to the task, in stream order: held lines, then what is
        pending, a chunk per turn of the loop while it is behind (none while a scrape is
        served); then the end of the stream, or back to handling data in the callback."""
        scrape = self._scrape_first
        behind = False
        while True:
            if self._failure is not None:
                raise self._failure
            if self._held:
                lines, self._held = self._held, []
                await self._handle_lines(lines)
                continue
            backlog = self._backlog
            if not backlog:
                break
            if behind or len(backlog) > READ_CHUNK:
                # Behind: handling it all without a yield would hold the loop for this
                # connection's whole backlog (exporter.runtime.fairness).  While a scrape is served, it
                # waits for it to be written (what arrives meanwhile waits in `_backlog`, then
                # in the socket).
                if scrape is not None and scrape.active():
                    await scrape.served()
                else:
                    await asyncio.sleep(0)
                if self._failure is not None:
                    raise self._failure
            got = self._clock()
            behind = len(backlog) >= READ_CHUNK  # a full chunk now: yield before the next
            data = bytes(memoryview(backlog)[:READ_CHUNK])
            del backlog[:READ_CHUNK]
            if self._paused and len(backlog) <= READ_BUFFER_BYTES:
                self._paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
            await self._handle_lines(self._split(data))
            if not self._backlog and not self._partial:
                self._through = got
        if self._at_end:
            if self._partial:  # QEMU's last line, cut by the end of the stream
                line = b"".join(self._partial)
                self._partial, self._partial_len = [], 0
                self.lines_received += 1
                await self._handle_lines([line])
            raise self._end_error or EOFError
        self._direct = True
        self._waiting = True

    def _detach(self) -> None:
        """The reader task ends: nothing is handled any more (the library closes the stream)."""
        self._direct = False
        self._waiting = False
        stream = self._stream
        if stream is not None:
            stream.detach()
            self._pause_reading()

    def _split(self, data: bytes) -> list[bytes]:
        """The complete lines of ``data`` (with what came before them); the rest is kept."""
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
        self.lines_received += len(lines)
        return lines

    def _dispatch(self, lines: list[bytes]) -> int:
        """Handle ``lines`` in order; stop at the first that takes the library's path (a
        coroutine: the reader task's) and return its index, or ``len(lines)``.

        Lines are decoded with orjson (stdlib json if orjson refuses, e.g. NaN or an integer
        beyond 64 bits), events go to ``on_event`` and replies to `query`."""
        handler = self._on_event_cb
        resolve = self._resolve_query
        loads = orjson.loads
        for i, line in enumerate(lines):
            try:
                obj = loads(line)
            except orjson.JSONDecodeError:
                try:
                    obj = json.loads(line)
                except ValueError:
                    return i  # not JSON: the library's path reports it as it always did
            if type(obj) is not dict:
                return i
            if "event" in obj:  # how qemu.qmp routes events, too
                if handler is None:
                    return i
                handler(obj)
            elif not resolve(obj):
                return i
        return len(lines)

    async def _handle_lines(self, lines: list[bytes]) -> None:
        while lines:
            done = self._dispatch(lines)
            if done == len(lines):
                return
            msg = self._cb_inbound(Message(lines[done], eager=True))
            await self._on_message(msg)
            lines = lines[done + 1 :]

    async def _establish_session(self) -> None:
        # Installed before the library reads the greeting: `_Stream` then sees every byte and
        # the end of the stream, whenever it comes.
        self._reset_reader()
        self._install_stream()
        await super()._establish_session()

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


#: The receive buffer of every connection: a transport reads into it and `_Stream` copies out
#: what it received before returning (all on the event loop's thread).  As large as asyncio's
#: own reads (``max_size``): a reader that is behind empties the socket in one read.
_READ_VIEW = memoryview(bytearray(256 * 1024))


class _Stream(asyncio.BufferedProtocol):
    """The connection's protocol (`ReadOnlyQMPClient._install_stream`).  Until `attach` it
    feeds asyncio's StreamReaderProtocol (``inner``, whose StreamReader the library reads the
    greeting and negotiation from); after, it hands the client what arrives, in the transport's
    callback.  ``inner`` stays behind it for the StreamWriter: flow control of writes
    (``pause_writing``) and the end of the connection (``wait_closed``)."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self._inner = inner
        self._feed: Callable[[int], None] | None = None
        self._end: Callable[[BaseException | None], None] | None = None
        self._attached = False
        self._ended = False  # before `attach`

    def attach(self, feed: Callable[[int], None], end: Callable[[BaseException | None], None]) -> bool:
        """From now on, ``feed(n)`` for every ``n`` bytes received (in `_READ_VIEW`), ``end``
        at the end of the stream or connection.  True if the stream has ended already."""
        self._attached = True
        if self._ended:
            return True
        self._feed, self._end = feed, end
        return False

    def detach(self) -> None:
        """Nothing is handed on any more."""
        self._attached = True
        self._feed = self._end = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        feed = self._feed
        if feed is not None:
            feed(nbytes)
        elif not self._attached:
            self._inner.data_received(bytes(_READ_VIEW[:nbytes]))

    def eof_received(self) -> bool | None:
        if not self._attached:
            self._ended = True
        elif self._end is not None:
            self._end(None)
        return self._inner.eof_received()  # the StreamReaderProtocol's: keep writing possible

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._attached:
            self._ended = True
        elif self._end is not None:
            self._end(exc)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
