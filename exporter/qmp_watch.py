"""One QMP session per QEMU socket: connect, identify, read disks and policies, follow events.

A `VMWatcher` owns one socket for as long as discovery sees it: it connects, identifies the
VM and reads its disks, watches (events, periodic polls), and backs off before the next
attempt when a session fails.  Every QMP command has a timeout, and a session that stops answering is dropped
and retried with capped exponential backoff and jitter, so one bad socket never stalls the
others.  Only read-only commands can be sent (`exporter.qmp.readonly`).  What QEMU says is
turned into the model (its typed events, `exporter.model.events`) by this module and the
replies and messages it reads (`exporter.qmp.replies`, `exporter.qmp.messages`), nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, Runstate
from qemu.qmp.error import ProtocolError
from qemu.qmp.protocol import StateError

from exporter.config import Config
from exporter.model.disk_source import source_from_query_block
from exporter.model.events import BlockIOError, RunStateChange, VMEvent
from exporter.model.sink import EventSink
from exporter.model.state import Disk, Part, VMState, is_uint64
from exporter.qmp import replies
from exporter.qmp.failures import SessionLost, SilenceWatchdog, connect_error_reason, gather
from exporter.qmp.messages import UNMATCHED_BUFFER, Held, HeldIOError, StatsReply, decode_message
from exporter.qmp.readonly import ReadOnlyQMPClient
from exporter.runtime.backoff import Backoff
from exporter.runtime.fairness import ScrapeFirst
from exporter.storage import BackendResolver

log = logging.getLogger("exporter.qmp")


class VMWatcher:
    """Watches one QMP socket until stopped."""

    def __init__(
        self,
        vm: VMState,
        config: Config,
        *,
        sink: EventSink | None = None,
        clock: Callable[[], float],
        setup_slots: asyncio.Semaphore | None = None,
        scrape_first: ScrapeFirst | None = None,
        backends: BackendResolver | None = None,
    ) -> None:
        self.vm = vm
        self.backends = backends or BackendResolver(config)
        self._setup_slots = setup_slots
        self._scrape_first = scrape_first
        self.config = config
        self.sink = sink or EventSink()
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        #: The current session's client, None between sessions (read by `exporter.runtime.liveness`).
        self.client: ReadOnlyQMPClient | None = None
        self._wake = asyncio.Event()  # cuts a backoff short (socket re-created)
        self._poll_now = asyncio.Event()  # asks the poller for an immediate refresh
        self._refresh_disks_now = False
        self._refresh_lock = asyncio.Lock()
        self._last_error_reason: str | None = None
        self._stopping = False
        # Events and blockstats replies of the current session, in QEMU's order: held until
        # it is established (disks known), then applied as they arrive, from the client's
        # reader (`_on_qmp_event`, `_on_blockstats`).
        self._held_events: list[Held] = []
        self._events_live = False
        self._event_failure: BaseException | None = None
        self._event_failed = asyncio.Event()
        self._unmatched: list[Mapping[str, Any] | HeldIOError] = []  # BLOCK_IO_ERRORs awaiting a disk refresh

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"qmp-watch:{self.vm.socket}")

    async def stop(self, grace: float = 5.0) -> None:
        """Cancel the watcher and wait for it, at most ``grace`` seconds: a shutdown must
        finish (and save hang state) even if a library swallowed the cancellation."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            self._wake.set()
            await asyncio.wait({self._task}, timeout=grace)
            if not self._task.done():
                log.warning(
                    "QMP watcher did not stop in time", extra={"vm": self.vm.vm, "socket": self.vm.socket}
                )

    def poke(self) -> None:
        """The socket file was (re)created: try now instead of finishing the backoff."""
        self._wake.set()

    async def _run(self) -> None:
        qc = self.config.qmp
        backoff = Backoff(qc.backoff_initial_seconds, qc.backoff_max_seconds)
        while not self._stopping:
            try:
                established = await self._session()
            except Exception:  # a bug must not end the watch of this VM: log, back off, retry
                log.exception("QMP watcher error", extra={"vm": self.vm.vm, "socket": self.vm.socket})
                self.vm.internal_errors += 1
                established = False
            if established:
                backoff.reset()
            delay = backoff.next_delay()
            self._wake.clear()
            if self._stopping:
                break
            # asyncio.timeout, never wait_for: on Python 3.11 wait_for can swallow a cancel
            # (CPython gh-86296), and a watcher that ignores stop() hangs the shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # -- one session -------------------------------------------------------------------

    async def _session(self) -> bool:
        """Run one QMP session to its end: connect, identify the VM and read its disks, watch.
        True when it got as far as watching."""
        self._held_events = []
        self._events_live = False
        self._event_failure = None
        self._event_failed.clear()
        client = ReadOnlyQMPClient(
            self.vm.vm, on_event=self._on_qmp_event, scrape_first=self._scrape_first, clock=self.clock
        )
        if not await self._connect(client):
            return False
        established = False
        self.client = client
        try:
            # Fleet-wide: only so many sessions are set up at once (discovery.SETUP_CONCURRENCY).
            async with self._setup_slots or contextlib.nullcontext():
                await self._identify(client)
                await self._refresh_disks(client)
                await self._poll_stats(client)
            established = True
            self._go_live(client)
            await self._watch(client)
        except SessionLost as exc:
            # A command cut short because QEMU closed the connection: the session ended (logged
            # by `_end_session`), as when the disconnect is noticed first.
            if not exc.closed:
                if self._last_error_reason != "lost":
                    log.warning(
                        "QMP session lost",
                        extra={"vm": self.vm.vm, "socket": self.vm.socket, "err": str(exc)},
                    )
                self._last_error_reason = "lost"
        finally:
            await self._end_session(client, established)
        return established

    async def _connect(self, client: ReadOnlyQMPClient) -> bool:
        """Connect ``client``; a failure is counted, logged once per reason, and False."""
        vm = self.vm
        vm.connect_attempts += 1
        try:
            async with asyncio.timeout(self.config.qmp.connect_timeout_seconds):
                await client.connect(vm.socket)
        except asyncio.CancelledError:
            await self._close(client)
            raise
        except Exception as exc:  # every failure is counted, logged once, and retried
            task = asyncio.current_task()
            if self._stopping or (task is not None and task.cancelling()):
                # qemu.qmp turns a cancel that lands inside connect() into a ConnectError.
                await self._close(client)
                raise asyncio.CancelledError from exc
            reason = connect_error_reason(exc)
            vm.connect_errors[reason] += 1
            vm.last_connect_error = reason
            vm.changed(Part.COUNTERS)
            self.sink.on_connect_failed(vm, self.clock(), reason)
            if reason != self._last_error_reason:
                log.warning(
                    "QMP connect failed",
                    extra={"vm": vm.vm, "socket": vm.socket, "reason": reason, "err": str(exc)},
                )
                self._last_error_reason = reason
            await self._close(client)
            return False
        return True

    def _go_live(self, client: ReadOnlyQMPClient) -> None:
        """The VM and its disks are read: apply what was held, and mark the VM up."""
        vm = self.vm
        self._release_events()  # before the session starts: the first sample is no poll
        vm.stream = client  # hang tracking advances this VM only as far as it is read
        vm.up = True
        vm.last_connect_error = ""
        self.sink.on_session_start(vm, self.clock())
        if self._last_error_reason != "connected":
            log.info(
                "QMP session established",
                extra={"vm": vm.vm, "socket": vm.socket, "disks": len(vm.disks)},
            )
        self._last_error_reason = "connected"

    async def _watch(self, client: ReadOnlyQMPClient) -> None:
        """Follow the session until it ends: events (applied by the client's reader), polls,
        the disconnect.  SessionLost from the poller; a bug in event handling stays loud."""
        tasks = [
            asyncio.create_task(self._event_errors()),
            asyncio.create_task(self._poll_loop(client)),
            asyncio.create_task(self._until_disconnected(client)),
        ]
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, SessionLost):
                    await t

    async def _end_session(self, client: ReadOnlyQMPClient, established: bool) -> None:
        """Apply what QEMU sent before the end (no event is lost), count and log the end."""
        vm = self.vm
        self._events_live = False
        held, self._held_events = self._held_events, []
        for item in held:
            self._apply_held(item)
        self._replay_unmatched()
        vm.stream = None
        if established:
            vm.disconnects += 1
            if self._last_error_reason == "connected":
                # Sessions the exporter ends itself (shutdown, socket gone) are no warning.
                level = logging.DEBUG if self._stopping else logging.WARNING
                log.log(level, "QMP session ended", extra={"vm": vm.vm, "socket": vm.socket})
                self._last_error_reason = "ended"
        gone = vm.status == "shutdown"
        self.sink.on_session_end(vm, self.clock(), gone)
        vm.end_session()
        self.client = None
        await self._close(client)

    async def read_once(self) -> str | None:
        """Connect, identify the VM, read its disks and their policy, disconnect: one session
        without watching, for ``qemu-iohang-check``.  The same read-only commands, timeouts and
        parsing as a watch session, so the check and the exporter cannot disagree about a disk.

        Returns None when everything was read, else why not: a `connect_error_reason`, or
        ``lost`` when the session failed while reading."""
        vm = self.vm
        client = ReadOnlyQMPClient(vm.vm)
        try:
            try:
                async with asyncio.timeout(self.config.qmp.connect_timeout_seconds):
                    await client.connect(vm.socket)
            except Exception as exc:
                return connect_error_reason(exc)
            try:
                await self._identify(client)
                await self._refresh_disks(client)
            except (SessionLost, ExecuteError):
                return "lost"
            vm.up = True
            return None
        finally:
            await self._close(client)

    @staticmethod
    async def _close(client: ReadOnlyQMPClient) -> None:
        # disconnect() re-raises whatever killed the session; it has been accounted for.
        with contextlib.suppress(Exception):
            await client.disconnect()

    async def _until_disconnected(self, client: ReadOnlyQMPClient) -> None:
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()

    async def _cmd(
        self,
        client: ReadOnlyQMPClient,
        command: str,
        args: Mapping[str, object] | None = None,
        on_reply: Callable[[object], None] | None = None,
    ) -> Any:
        """Run one command with a timeout.  ExecuteError (QEMU said no) goes to the caller.

        The timeout means "QEMU said nothing at all for that long": while events keep
        arriving (a storm queued ahead of the reply, or an exporter short of CPU), the session
        is alive and the wait goes on.  Dropping a live session would lose the events QEMU
        already sent and the exporter has not read yet."""
        try:
            reply = client.query(command, args, on_reply)
            watchdog = SilenceWatchdog(client, reply, self.config.qmp.command_timeout_seconds)
            try:
                return await reply
            finally:
                watchdog.cancel()
        except ExecuteError:
            self.vm.command_errors[(command, "error")] += 1
            self.vm.changed(Part.COUNTERS)
            raise
        except TimeoutError:
            self.vm.command_errors[(command, "timeout")] += 1
            self.vm.changed(Part.COUNTERS)
            raise SessionLost(f"{command} timed out") from None
        except (ExecInterruptedError, StateError, EOFError, OSError) as exc:
            self.vm.command_errors[(command, "disconnected")] += 1
            self.vm.changed(Part.COUNTERS)
            raise SessionLost(f"{command}: {exc}", closed=True) from None
        except ProtocolError as exc:  # e.g. a reply with neither "return" nor a proper "error"
            self.vm.command_errors[(command, "protocol")] += 1
            self.vm.changed(Part.COUNTERS)
            raise SessionLost(f"{command}: {exc}") from None

    # -- reading QEMU ------------------------------------------------------------------

    async def _identify(self, client: ReadOnlyQMPClient) -> None:
        vm = self.vm
        # Every value is type-checked: a label value that is not a string would break every
        # scrape of the host, not just this VM.
        name = replies.field(await self._cmd(client, "query-name"), "name")
        vm.name = name if isinstance(name, str) and name else None
        uuid = replies.field(await self._cmd(client, "query-uuid"), "UUID")
        vm.uuid = uuid if isinstance(uuid, str) else ""
        q = replies.field(await self._cmd(client, "query-version"), "qemu")
        parts = [replies.field(q, k) for k in ("major", "minor", "micro")]
        vm.qemu_version = ".".join(str(p) if is_uint64(p) else "0" for p in parts)
        await self._read_status(client)
        vm.retry_feature = await self._detect_retry_feature(client)

    async def _read_status(self, client: ReadOnlyQMPClient) -> None:
        st = await self._cmd(client, "query-status")
        if isinstance(st, dict) and isinstance(st.get("status"), str):
            self.vm.status = st["status"]

    async def _detect_retry_feature(self, client: ReadOnlyQMPClient) -> bool:
        """openEuler's retry adds ``retry_interval`` to the disk devices (domain.md §2)."""
        for typename in ("virtio-blk-pci", "scsi-hd"):
            try:
                props = await self._cmd(client, "device-list-properties", {"typename": typename})
            except ExecuteError:
                continue
            if isinstance(props, list):
                return any(isinstance(p, dict) and p.get("name") == "retry_interval" for p in props)
        return False

    async def _refresh_disks(self, client: ReadOnlyQMPClient) -> None:
        """Re-read query-block; read policies only of disks not seen before (qdev properties
        cannot change after a device is realized, so known disks need no new qom-get)."""
        async with self._refresh_lock:
            self._refresh_disks_now = False
            blocks = await self._cmd(client, "query-block")
            disks: dict[str, Disk] = {}
            failed: set[str] = set()
            order: list[tuple[str, Disk | None]] = []
            reads: dict[int, Coroutine[Any, Any, Disk | None]] = {}
            for entry in replies.block_entries(blocks):
                device = entry.device
                if entry.io_failed:
                    failed.add(device)
                # Derived at every refresh: the medium, the mount table or the rules may change.
                backend = self.backends.backend(source_from_query_block(entry.inserted))
                known = self.vm.disks.get(device)
                if (
                    known
                    and known.qdev == entry.qdev
                    and known.node_name == entry.node
                    and known.drive == entry.drive
                ):
                    if known.backend != backend:
                        known = dataclasses.replace(known, backend=backend)
                    order.append((device, known))
                    continue
                reads[len(order)] = self._read_disk(client, entry, backend)
                order.append((device, None))
            # New disks are read concurrently: QEMU answers in turn, but the round trips overlap.
            for i, disk in zip(reads, await gather(reads.values()), strict=True):
                order[i] = (order[i][0], disk)
            for device, maybe in order:
                if maybe is not None:
                    disks[device] = maybe
            self.vm.io_failed = frozenset(failed & disks.keys())
            self.vm.set_disks(disks)
            self.sink.on_disks(self.vm, self.clock())
            self._replay_unmatched()

    async def _read_disk(
        self, client: ReadOnlyQMPClient, entry: replies.BlockEntry, backend: str
    ) -> Disk | None:
        async def prop(name: str) -> object:
            try:
                return await self._cmd(client, "qom-get", {"path": entry.qom_path, "property": name})
            except ExecuteError:
                return None

        qom_type = await prop("type")
        if replies.is_skipped(qom_type):
            return None
        retry_feature = bool(self.vm.retry_feature)
        names = replies.POLICY_PROPERTIES + (replies.RETRY_PROPERTIES if retry_feature else ())
        props = dict(zip(names, await gather(prop(n) for n in names), strict=True))
        return replies.disk(entry, backend, qom_type, props, retry_feature, self.config.policy)

    async def _poll_stats(self, client: ReadOnlyQMPClient) -> None:
        await self._cmd(client, "query-blockstats", on_reply=_StatsRequest(self, self.clock()))

    def _on_blockstats(self, stats: object, sent: float) -> None:
        """The query-blockstats reply at its place in QEMU's stream (called by the reader): it
        is applied before any event QEMU wrote after it.  Hang inference depends on that order
        (`exporter.hang.machine`, "Order of inputs"); the awaiting task resumes too late.

        Stamped with the time the command was sent, not read: QEMU wrote the reply after that,
        and every event written before the reply has been handled when it is read, so the
        stream is known to be read up to the stamp.  The read time is later by however far the
        reader is behind (seconds in a storm it cannot keep up with), and a sample stamped with
        it told hang tracking that the disk had been silent that long: one continuous hang
        counted as many (every disk of 4000 at 1000 VMs, 60,000 events/s offered)."""
        sample = StatsReply(stats, sent)
        if self._events_live:
            self._apply_stats(sample)
        else:
            self._held_events.append(sample)

    def _apply_stats(self, sample: StatsReply) -> None:
        for device, stats in replies.blockstats(sample.reply, self.vm.match_disk):
            self.vm.blockstats[device] = stats
        self.vm.changed(Part.STATS)
        self.sink.on_blockstats(self.vm, sample.time)

    async def _poll_loop(self, client: ReadOnlyQMPClient) -> None:
        """Periodic reads; also the session's heartbeat: a QEMU that stops answering is dropped."""
        qc = self.config.qmp
        loop = asyncio.get_running_loop()
        # A random phase per session: the VMs of a host connect together, and polls and disk
        # refreshes in step would come as bursts of 1000 replies that a scrape waits behind.
        # The first poll comes one to two intervals after the session started (which read
        # everything), so that no poll competes with VMs still connecting.
        next_refresh = loop.time() + qc.refresh_interval_seconds * random.uniform(0.5, 1.0)
        delay = qc.poll_interval_seconds * random.uniform(1.0, 2.0)
        while True:
            self._poll_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._poll_now.wait()
            delay = qc.poll_interval_seconds
            await self._read_status(client)
            if self._refresh_disks_now or loop.time() >= next_refresh:
                await self._refresh_disks(client)
                next_refresh = loop.time() + qc.refresh_interval_seconds
            await self._poll_stats(client)

    # -- events ------------------------------------------------------------------------

    def _on_qmp_event(self, event: dict[str, Any]) -> None:
        """Called by the client's reader for every event, in order."""
        if not self._events_live:
            self._held_events.append(HeldIOError.hold(event))
            return
        try:
            self._handle_event(event)
        except Exception as exc:  # a bug in event handling ends the session, loudly (_run)
            self._events_live = False
            self._event_failure = exc
            self._event_failed.set()

    def _release_events(self) -> None:
        """The session is established: apply what was held so far, then each as it comes."""
        held, self._held_events = self._held_events, []
        for item in held:
            self._apply_held(item)
        self._events_live = True

    def _apply_held(self, item: Held) -> None:
        if isinstance(item, StatsReply):
            self._apply_stats(item)
        else:
            self._handle_event(item)

    async def _event_errors(self) -> None:
        await self._event_failed.wait()
        assert self._event_failure is not None
        raise self._event_failure

    def _handle_event(self, event: Mapping[str, Any] | HeldIOError) -> str | None:
        """Apply one QMP event (as it came, or as held during connect).  Synchronous: events
        are applied in order, and the per-event work is O(1) whatever the fleet size.  Returns
        the disk a BLOCK_IO_ERROR matched."""
        typed = decode_message(event, self.vm)
        if type(typed) is BlockIOError and typed.device is not None:
            # The storm's case, first and with the fewest steps (`_apply` in one go).
            self.vm.received_io_error(typed)
            self.sink.on_event(self.vm, typed)
            return typed.device
        self.vm.received(typed)
        if (
            isinstance(typed, BlockIOError)
            and typed.device is None
            and len(self._unmatched) < UNMATCHED_BUFFER
        ):
            # Most likely a disk hot-plugged since the last refresh (QEMU announces no plug):
            # hold the event, re-read the disk list, then attribute it.
            self._unmatched.append(event)
            self._refresh_disks_now = True
            self._poll_now.set()
            return None
        self._apply(typed)
        if isinstance(typed, RunStateChange):
            self._poll_now.set()
        elif typed.name == "DEVICE_DELETED":
            self._refresh_disks_now = True
            self._poll_now.set()
        return typed.device if isinstance(typed, BlockIOError) else None

    def _apply(self, event: VMEvent) -> None:
        self.vm.apply(event)
        self.sink.on_event(self.vm, event)

    def _replay_unmatched(self) -> None:
        """Attribute the BLOCK_IO_ERRORs held for want of a disk, now that the list is fresh;
        what still matches nothing is counted as unmatched."""
        pending, self._unmatched = self._unmatched, []
        for event in pending:
            self._apply(decode_message(event, self.vm))


class _StatsRequest:
    """The ``on_reply`` of one query-blockstats: hands the reply and the time the command was
    sent to `VMWatcher._on_blockstats` (a plain object, like `exporter.qmp.failures.SilenceWatchdog`)."""

    __slots__ = ("_sent", "_watcher")

    def __init__(self, watcher: VMWatcher, sent: float) -> None:
        self._watcher, self._sent = watcher, sent

    def __call__(self, stats: object) -> None:
        self._watcher._on_blockstats(stats, self._sent)
