"""One QMP session per QEMU socket: connect, identify, read disks and policies, follow events.

A `VMWatcher` owns one socket for as long as discovery sees it: it connects, identifies the
VM and reads its disks, watches (events, periodic polls), and backs off before the next
attempt when a session fails.  Every QMP command has a timeout, and a session that stops answering is dropped
and retried with capped exponential backoff and jitter, so one bad socket never stalls the
others.  Only read-only commands can be sent (`exporter.qmp.readonly`).  What QEMU says is
turned into the model's typed events (`exporter.model.events`) here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import random
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, Runstate
from qemu.qmp.error import ProtocolError
from qemu.qmp.protocol import StateError

from exporter.config import Config
from exporter.model.disk_source import source_from_query_block
from exporter.model.events import BlockIOError, RunStateChange, VMEvent, decode, event_time
from exporter.model.policy import DiskPolicy, verify
from exporter.model.sink import EventSink
from exporter.model.state import BlockStats, Disk, Part, VMState, is_uint64, uint64
from exporter.qmp.readonly import ReadOnlyQMPClient
from exporter.runtime.backoff import Backoff
from exporter.runtime.fairness import ScrapeFirst
from exporter.runtime.fd_limit import FD_LIMIT
from exporter.storage import BackendResolver

log = logging.getLogger("exporter.qmp")
T = TypeVar("T")

#: Disk types that never hold guest data worth protecting (removable media).
_SKIPPED_TYPES = ("ide-cd", "scsi-cd", "floppy", "usb-storage")

#: BLOCK_IO_ERRORs held per VM while its disk list is re-read; beyond this they count as unmatched.
_UNMATCHED_BUFFER = 1024


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


def device_from_qdev(qdev: str) -> tuple[str, str]:
    """(device id, QOM path) from query-block's ``qdev``.

    virtio-blk shows ``/machine/peripheral/<id>/virtio-backend``, scsi-hd the bare ``<id>``
    (domain.md §2); devices added without an id live under ``/machine/peripheral-anon``.
    """
    path = qdev
    if path.endswith("/virtio-backend"):
        path = path[: -len("/virtio-backend")]
    if not path.startswith("/"):
        return path, f"/machine/peripheral/{path}"
    if path.startswith("/machine/peripheral/"):
        return path[len("/machine/peripheral/") :], path
    return path.removeprefix("/machine/"), path


def qdev_kind(qom_type: str) -> str:
    if qom_type.startswith("virtio-blk"):
        return "virtio-blk"
    return qom_type


def _field(obj: object, key: str) -> object:
    return obj.get(key) if isinstance(obj, dict) else None


def parse_blockstats(stats: Mapping[str, Any]) -> BlockStats:
    def i(key: str) -> int:
        return uint64(stats, key)

    idle = stats.get("idle_time_ns")
    return BlockStats(
        read_bytes=i("rd_bytes"),
        written_bytes=i("wr_bytes"),
        read_ops=i("rd_operations"),
        write_ops=i("wr_operations"),
        flush_ops=i("flush_operations"),
        failed_read_ops=i("failed_rd_operations"),
        failed_write_ops=i("failed_wr_operations"),
        failed_flush_ops=i("failed_flush_operations"),
        read_time_s=i("rd_total_time_ns") / 1e9,
        write_time_s=i("wr_total_time_ns") / 1e9,
        flush_time_s=i("flush_total_time_ns") / 1e9,
        idle_s=idle / 1e9 if is_uint64(idle) else None,
    )


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
        self._held_events: list[dict[str, Any] | HeldIOError | _StatsReply] = []
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
        """Run one QMP session to its end.  True when it got as far as watching."""
        vm, qc = self.vm, self.config.qmp
        self._held_events = []
        self._events_live = False
        self._event_failure = None
        self._event_failed.clear()
        client = ReadOnlyQMPClient(
            vm.stem, on_event=self._on_qmp_event, scrape_first=self._scrape_first, clock=self.clock
        )
        vm.connect_attempts += 1
        try:
            async with asyncio.timeout(qc.connect_timeout_seconds):
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

        established = False
        tasks: list[asyncio.Task[None]] = []
        self.client = client
        try:
            # Fleet-wide: only so many sessions are set up at once (discovery.SETUP_CONCURRENCY).
            async with self._setup_slots or contextlib.nullcontext():
                await self._identify(client)
                await self._refresh_disks(client)
                await self._poll_stats(client)
            established = True
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
            tasks = [
                asyncio.create_task(self._event_errors()),
                asyncio.create_task(self._poll_loop(client)),
                asyncio.create_task(self._until_disconnected(client)),
            ]
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # SessionLost from the poller; a bug in event handling stays loud
        except SessionLost as exc:
            # A command cut short because QEMU closed the connection: the session ended (logged
            # below), as when the disconnect is noticed first.
            if not exc.closed:
                if self._last_error_reason != "lost":
                    log.warning("QMP session lost", extra={"vm": vm.vm, "socket": vm.socket, "err": str(exc)})
                self._last_error_reason = "lost"
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, SessionLost):
                    await t
            # Events QEMU sent before the end still count: no event is lost.
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
        return established

    async def read_once(self) -> str | None:
        """Connect, identify the VM, read its disks and their policy, disconnect: one session
        without watching, for ``qemu-iohang-check``.  The same read-only commands, timeouts and
        parsing as a watch session, so the check and the exporter cannot disagree about a disk.

        Returns None when everything was read, else why not: a `connect_error_reason`, or
        ``lost`` when the session failed while reading."""
        vm = self.vm
        client = ReadOnlyQMPClient(vm.stem)
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
            watchdog = _SilenceWatchdog(client, reply, self.config.qmp.command_timeout_seconds)
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
        name = _field(await self._cmd(client, "query-name"), "name")
        vm.name = name if isinstance(name, str) and name else None
        uuid = _field(await self._cmd(client, "query-uuid"), "UUID")
        vm.uuid = uuid if isinstance(uuid, str) else ""
        q = _field(await self._cmd(client, "query-version"), "qemu")
        parts = [_field(q, k) for k in ("major", "minor", "micro")]
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
            for entry in blocks if isinstance(blocks, list) else []:
                if not isinstance(entry, dict):
                    continue
                qdev = entry.get("qdev")
                inserted = entry.get("inserted")
                if not isinstance(qdev, str) or not qdev or not isinstance(inserted, dict):
                    continue
                device, qom_path = device_from_qdev(qdev)
                if entry.get("io-status") == "failed":
                    failed.add(device)
                drive = entry.get("device") if isinstance(entry.get("device"), str) else ""
                node = inserted.get("node-name") if isinstance(inserted.get("node-name"), str) else ""
                # Derived at every refresh: the medium, the mount table or the rules may change.
                backend = self.backends.backend(source_from_query_block(inserted))
                known = self.vm.disks.get(device)
                if known and known.qdev == qdev and known.node_name == node and known.drive == drive:
                    if known.backend != backend:
                        known = dataclasses.replace(known, backend=backend)
                    order.append((device, known))
                    continue
                reads[len(order)] = self._read_disk(
                    client, device, qom_path, qdev, str(drive), str(node), backend
                )
                order.append((device, None))
            # New disks are read concurrently: QEMU answers in turn, but the round trips overlap.
            for i, disk in zip(reads, await _gather(reads.values()), strict=True):
                order[i] = (order[i][0], disk)
            for device, maybe in order:
                if maybe is not None:
                    disks[device] = maybe
            self.vm.io_failed = frozenset(failed & disks.keys())
            self.vm.set_disks(disks)
            self.sink.on_disks(self.vm, self.clock())
            self._replay_unmatched()

    async def _read_disk(
        self,
        client: ReadOnlyQMPClient,
        device: str,
        qom_path: str,
        qdev: str,
        drive: str,
        node: str,
        backend: str,
    ) -> Disk | None:
        async def prop(name: str) -> object:
            try:
                return await self._cmd(client, "qom-get", {"path": qom_path, "property": name})
            except ExecuteError:
                return None

        qom_type = await prop("type")
        if isinstance(qom_type, str) and qom_type.startswith(_SKIPPED_TYPES):
            return None
        names = ["werror", "rerror"]
        if self.vm.retry_feature:
            names += ["retry_interval", "retry_timeout"]
        values = await _gather(prop(n) for n in names)
        werror, rerror = values[0], values[1]
        interval = timeout = None
        if self.vm.retry_feature:
            i, t = values[2], values[3]
            interval = i if is_uint64(i) else None
            timeout = t if is_uint64(t) else None
        policy = DiskPolicy(
            werror=werror if isinstance(werror, str) else "unknown",
            rerror=rerror if isinstance(rerror, str) else "unknown",
            retry_interval_ms=interval,
            retry_timeout_ms=timeout,
            retry_feature=bool(self.vm.retry_feature),
        )
        return Disk(
            device=device,
            drive=drive,
            node_name=node,
            qdev=qdev,
            qom_path=qom_path,
            qdev_type=qdev_kind(qom_type) if isinstance(qom_type, str) else "unknown",
            policy=policy,
            verdict=verify(policy, self.config.policy),
            backend=backend,
        )

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
        sample = _StatsReply(stats, sent)
        if self._events_live:
            self._apply_stats(sample)
        else:
            self._held_events.append(sample)

    def _apply_stats(self, sample: _StatsReply) -> None:
        stats = sample.reply
        for entry in stats if isinstance(stats, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("stats"), dict):
                continue
            # Same keys as query-block: the lookups kept for BLOCK_IO_ERROR serve here too.
            device = self.vm.match_disk(
                {
                    "node-name": entry.get("node-name"),
                    "device": entry.get("device"),
                    "qom-path": entry.get("qdev"),
                }
            )
            if device is not None:
                self.vm.blockstats[device] = parse_blockstats(entry["stats"])
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

    def _apply_held(self, item: dict[str, Any] | HeldIOError | _StatsReply) -> None:
        if isinstance(item, _StatsReply):
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
            and len(self._unmatched) < _UNMATCHED_BUFFER
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
    sent to `VMWatcher._on_blockstats` (a plain object, like `_SilenceWatchdog`)."""

    __slots__ = ("_sent", "_watcher")

    def __init__(self, watcher: VMWatcher, sent: float) -> None:
        self._watcher, self._sent = watcher, sent

    def __call__(self, stats: object) -> None:
        self._watcher._on_blockstats(stats, self._sent)


@dataclass(slots=True)
class HeldIOError:
    """A BLOCK_IO_ERROR held while its session is being established (its disks are not known
    yet): only what `decode_message` reads of it, names interned.  An exporter started into a
    storm holds ~50 events per VM: as decoded messages (three dicts each, ~1.2 KB) that was
    ~30 MB of its 165-175 MB high-water at 1000 VMs x 4 disks (docs/performance.md, round 5)."""

    seconds: object
    microseconds: object
    node_name: object
    device: object
    qom_path: object
    operation: object
    action: object

    @staticmethod
    def hold(event: dict[str, Any]) -> HeldIOError | dict[str, Any]:
        """``event`` as held: a `HeldIOError` when it is a well-formed BLOCK_IO_ERROR, else
        itself (rare: other events, malformed ones)."""
        ts, data = event.get("timestamp"), event.get("data")
        if event.get("event") != "BLOCK_IO_ERROR" or type(ts) is not dict or type(data) is not dict:
            return event
        get = data.get
        return HeldIOError(
            ts.get("seconds"),
            ts.get("microseconds"),
            _intern(get("node-name")),
            _intern(get("device")),
            _intern(get("qom-path")),
            get("operation"),
            get("action"),
        )

    def typed(self, vm: VMState) -> VMEvent:
        """What `decode_message` makes of the message it was."""
        data = {
            "node-name": self.node_name,
            "device": self.device,
            "qom-path": self.qom_path,
            "operation": self.operation,
            "action": self.action,
        }
        return decode("BLOCK_IO_ERROR", data, event_time(self.seconds, self.microseconds), vm.match_disk)


def _intern(value: object) -> object:
    return sys.intern(value) if type(value) is str else value


@dataclass(frozen=True, slots=True)
class _StatsReply:
    """A query-blockstats reply and when its command was sent (QEMU stamps no reply)."""

    reply: object
    time: float


class _SilenceWatchdog:
    """Fails ``reply`` with TimeoutError once QEMU has sent no line at all for ``timeout``
    seconds (see `VMWatcher._cmd`).  One timer per command; a plain object rather than a
    closure, which would reference itself and leave cyclic garbage behind every command."""

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


async def _gather(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
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


def decode_message(event: Mapping[str, Any] | HeldIOError, vm: VMState) -> VMEvent:
    """A QMP event message (or one held while its session was established) as the model's
    typed event."""
    if isinstance(event, HeldIOError):
        return event.typed(vm)
    ts = event.get("timestamp")
    time = event_time(ts.get("seconds"), ts.get("microseconds")) if isinstance(ts, dict) else None
    return decode(event.get("event"), event.get("data"), time, vm.match_disk)
