"""The libvirt source: every running domain of a libvirt URI, watched through libvirtd itself.

libvirt holds each VM's only QMP monitor, so on a libvirt host this source asks libvirtd
instead, without changing or tainting any domain (domain.md §4.1):

* QEMU's own events, with QEMU's timestamps, from libvirt's monitor-event forwarding
  (``qemuMonitorEventRegister``: needs a read-write connection; it does not taint).  libvirt's
  own IO-error event is useless here: it maps ``retry`` to ``none`` and is never delivered for
  network disks.
* Disks and their policy from the live domain XML (`exporter.libvirt.domxml`), never from
  monitor commands: ``qemu-monitor-command`` taints the domain ``custom-monitor``.
* Run state and block statistics of every domain from one ``getAllDomainStats`` per poll.
* Domains started, stopped or migrated from lifecycle events, with a periodic full listing as a
  safety net.

libvirt-python calls block.  libvirt's event loop runs in one thread of its own (shared by all
URIs) and hands callbacks to the asyncio loop in batches (`exporter.libvirt.inbox`); every other
call runs in this source's worker threads under a timeout (`exporter.libvirt.calls`).  What
libvirt reports becomes the model's run states, disks and statistics in
`exporter.libvirt.translate`.  A stuck libvirtd therefore never delays a scrape or
another source: the call is abandoned, the connection re-opened with backoff, and hang state is
kept (trackers are told the session dropped, not that the VM went away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from exporter.config import Config, static_labels
from exporter.libvirt.calls import (
    STATS,
    CallFailed,
    all_stats,
    close_quietly,
    connect_reason,
    ensure_event_loop,
    failed_targets,
    in_thread,
    is_libvirt_error,
)
from exporter.libvirt.domxml import parse_domain
from exporter.libvirt.inbox import ErrorRun, EventInbox
from exporter.libvirt.translate import (
    Span,
    blockstats_by_target,
    event_data,
    model_disks,
    qemu_version,
    run_state,
    typed_event,
)
from exporter.model.events import BlockIOError, BlockIOErrorRun, RunStateChange, event_time
from exporter.model.sink import EventSink
from exporter.model.state import ConnectionState, Part, VMState
from exporter.runtime.backoff import Backoff
from exporter.storage import BackendResolver

log = logging.getLogger("exporter.libvirt")
T = TypeVar("T")

#: Events held per domain while its disks are (re)read; beyond this they count as unmatched.
_HELD_PER_DOMAIN = 1024
#: Domains known at most (placeholders for events of domains not listed yet included).
_MAX_DOMAINS = 100_000
#: Distinct event texts kept parsed (`LibvirtSource._data`): a few per failing disk.
_PARSED_MAX = 4096

# libvirt constants, spelled out so this module imports without the binding (tests, mypy).
_LIFECYCLE_STARTED = 2
_LIFECYCLE_SUSPENDED = 3
_LIFECYCLE_RESUMED = 4
_LIFECYCLE_STOPPED = 5
_LIFECYCLE_SHUTDOWN = 6
_LIFECYCLE_CRASHED = 8

#: A QEMU event as `_Domain` holds it: (name, data, QEMU time, span).
_Held = tuple[str, Any, float | None, Span]


@dataclass
class _Domain:
    vm: VMState
    ready: bool = False  # disks read: events are applied, not held
    held: list[_Held] = field(default_factory=list)
    unmatched: list[_Held] = field(default_factory=list)
    targets: dict[str, str] = field(default_factory=dict)  # vda -> alias


class LibvirtSource:
    """Watches every running domain of one libvirt URI until stopped."""

    def __init__(
        self,
        uri: str,
        config: Config,
        sink: EventSink,
        clock: Callable[[], float],
        backends: BackendResolver | None = None,
        *,
        on_blind: Callable[[str, float, float], None] | None = None,
    ) -> None:
        self.uri = uri
        self.config = config
        self.backends = backends or BackendResolver(config)
        self.sink = sink
        self.clock = clock
        self.state = ConnectionState(uri)
        self.domains: dict[str, _Domain] = {}  # by UUID
        self._conn: Any = None
        self._session_id = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._refresh: set[str] = set()  # UUIDs whose XML must be (re)read
        self._refresh_now = asyncio.Event()
        self._poll_now = asyncio.Event()
        self._stopping = False
        self._last_error: str | None = None
        self._inbox: EventInbox | None = None
        #: Told (uri, down since, back at) of every time the connection was down once it came
        #: back: events of that time are lost (`exporter.runtime.blind`).
        self._on_blind = on_blind
        self._down_since: float | None = None  # None: up, or never connected
        self._parsed: dict[str, Any] = {}  # `_data`

    @property
    def vms(self) -> list[VMState]:
        """Domains whose XML was read at least once (not placeholders for early events)."""
        return [d.vm for d in self.domains.values() if d.vm.name is not None]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._inbox = EventInbox(
            asyncio.get_running_loop(), self._on_item, self.clock, self.config.hang.recovery_margin_seconds
        )
        self._task = asyncio.create_task(self._run(), name=f"libvirt:{self.uri}")

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=grace)
        conn, self._conn = self._conn, None
        if conn is not None:
            in_thread(close_quietly, conn)  # may block on a stuck libvirtd: never waited for

    async def _run(self) -> None:
        lc = self.config.libvirt
        backoff = Backoff(lc.backoff_initial_seconds, lc.backoff_max_seconds)
        while not self._stopping:
            try:
                established = await self._session()
            except CallFailed as exc:
                established = False
                if self._last_error != "lost":
                    log.warning("libvirt connection lost", extra={"uri": self.uri, "err": str(exc)})
                    self._last_error = "lost"
            except Exception:  # a bug must not end the watch: log, back off, retry
                log.exception("libvirt source error", extra={"uri": self.uri})
                established = False
            finally:
                self._end_session()
            if established:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())

    # -- one connection ----------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking libvirt call in a thread of its own, under the call timeout.

        Daemon threads rather than an executor: a call stuck in a wedged libvirtd is abandoned,
        and must not hold up the process's exit (executors join their threads at exit)."""
        try:
            async with asyncio.timeout(self.config.libvirt.call_timeout_seconds):
                return await in_thread(fn, *args)
        except TimeoutError:
            self.state.call_errors[(what, "timeout")] += 1
            raise CallFailed(f"{what} timed out") from None
        except Exception as exc:
            if is_libvirt_error(exc):
                self.state.call_errors[(what, "error")] += 1
                raise CallFailed(f"{what}: {exc}") from None
            raise

    async def _session(self) -> bool:
        import libvirt
        import libvirt_qemu

        ensure_event_loop()
        self._session_id += 1
        session = self._session_id
        self._closed.clear()
        try:
            conn = await self._call("open", libvirt.open, self.uri)
        except CallFailed as exc:
            reason = connect_reason(str(exc))
            self.state.connect_errors[reason] += 1
            if self._last_error != reason:
                extra = {"uri": self.uri, "reason": reason, "err": str(exc)}
                if reason == "permission":  # monitor events need a read-write connection
                    extra["hint"] = "read-write access to libvirtd's socket is needed (docs/libvirt.md)"
                log.warning("libvirt connect failed", extra=extra)
                self._last_error = reason
            return False
        self._conn = conn
        inbox = self._inbox
        assert inbox is not None

        # Callbacks run in libvirt's event thread: they only copy what they need and post it
        # (the less they do, the faster libvirtd is drained: EventInbox).
        def on_close(_conn: Any, reason: int, _opaque: Any) -> None:
            inbox.put(("close", session, reason))

        def on_lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            uuid = dom.UUIDString()
            inbox.put(("lifecycle", session, uuid, event, detail), uuid)

        def on_device_added(_conn: Any, dom: Any, _alias: str, _opaque: Any) -> None:
            uuid = dom.UUIDString()
            inbox.put(("device-added", session, uuid), uuid)

        def on_monitor(
            _conn: Any, dom: Any, event: str, seconds: int, micros: int, details: Any, _opaque: Any
        ) -> None:
            inbox.put_event(session, dom.UUIDString(), event, seconds, micros, details)

        def register() -> int:
            conn.registerCloseCallback(on_close, None)
            conn.setKeepAlive(5, 3)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
            # QEMU announces no plug; libvirt does: a hot-plugged disk is read at once.
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, on_device_added, None)
            libvirt_qemu.qemuMonitorEventRegister(conn, None, None, on_monitor, None)
            return int(conn.getVersion())

        version = qemu_version(await self._call("register", register))
        self.state.up = True
        if self._down_since is not None and self._on_blind is not None:
            self._on_blind(self.uri, self._down_since, self.clock())
        self._down_since = None
        if self._last_error != "connected":
            log.info("libvirt connected", extra={"uri": self.uri})
        self._last_error = "connected"
        await self._relist(conn, version)
        tasks = [
            asyncio.create_task(self._poll_loop(conn)),
            asyncio.create_task(self._relist_loop(conn, version)),
            asyncio.create_task(self._refresh_loop(conn, version)),
            asyncio.create_task(self._closed.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
            log.warning("libvirt connection closed", extra={"uri": self.uri})
            self._last_error = "closed"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return True

    def _end_session(self) -> None:
        """The connection is gone: every domain's events stop flowing (hangs kept: the VMs may
        well run on); the next connection re-lists them."""
        self._session_id += 1  # late callbacks of the old connection are ignored
        now = self.clock()
        if self.state.up:  # blind from now until the next connection is established
            self._down_since = now
        self.state.up = False
        for uuid, d in self.domains.items():
            if d.ready:
                self.sink.on_session_end(d.vm, now, False)
            d.vm.end_session()
            d.vm.uuid = uuid  # still this domain: a VM also on a QMP socket stays reported once
            d.ready = False
            d.held.clear()
            d.unmatched.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            in_thread(close_quietly, conn)

    # -- reading libvirt ---------------------------------------------------------------

    async def _relist(self, conn: Any, version: str) -> None:
        """Every running domain, read afresh; domains no longer running are gone."""
        import libvirt

        stats = dict(await self._call("stats", all_stats, conn))

        def listing() -> list[tuple[str, str, set[str]]]:
            out = []
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                with contextlib.suppress(libvirt.libvirtError):  # it stopped meanwhile
                    uuid = dom.UUIDString()
                    out.append((uuid, dom.XMLDesc(0), failed_targets(dom, stats.get(uuid))))
            return out

        found = await self._call("list", listing)
        seen = {uuid for uuid, _xml, _failed in found}
        for uuid in [u for u in self.domains if u not in seen]:
            self._remove(uuid)
        for uuid, xml, failed in found:
            self._apply_xml(uuid, xml, version, stats.get(uuid), failed)

    async def _read_domain(self, conn: Any, uuid: str, version: str) -> None:
        import libvirt

        def read() -> tuple[str, dict[str, Any], set[str]] | None:
            try:
                dom = conn.lookupByUUIDString(uuid)
                if not dom.isActive():
                    return None
                xml = str(dom.XMLDesc(0))
                got = conn.domainListGetStats([dom], STATS)
                stats = got[0][1] if got else {}
                return xml, stats, failed_targets(dom, stats)
            except libvirt.libvirtError:
                return None  # gone again

        found = await self._call("dumpxml", read)
        if found is None:
            self._remove(uuid)
        else:
            xml, stats, failed = found
            self._apply_xml(uuid, xml, version, stats, failed)

    def _apply_xml(
        self,
        uuid: str,
        xml: str,
        version: str,
        stats: Mapping[str, Any] | None,
        failed_targets: set[str] | None = None,
    ) -> None:
        """A domain's disks as the live XML says, and its state and statistics when known:
        in the order a QMP session reads them (run state, disks, stats, then the session)."""
        try:
            domain = parse_domain(xml)
        except ValueError as exc:
            log.warning("unreadable domain XML", extra={"uri": self.uri, "uuid": uuid, "err": str(exc)})
            return
        for skipped in domain.skipped:
            log.warning(
                "disk not watched",
                extra={"vm": domain.name, "device": skipped.alias, "reason": skipped.reason},
            )
        d = self.domains.get(uuid)
        if d is None:
            d = self.domains[uuid] = _Domain(self._new_vm(uuid))
        vm = d.vm
        vm.name, vm.uuid, vm.qemu_version = domain.name, uuid, version
        disks = model_disks(domain, self.config, self.backends)
        # Retry proven by a disk that uses it (QEMU accepted it); libvirt cannot say otherwise.
        vm.retry_feature = True if any(disk.policy.retry_feature for disk in disks.values()) else None
        d.targets = {x.target: x.alias for x in domain.disks}
        vm.io_failed = frozenset(d.targets[t] for t in failed_targets or () if t in d.targets)
        now = self.clock()
        if stats is not None:
            self._set_status(vm, stats)
        vm.set_disks(disks)
        self.sink.on_disks(vm, now)
        if stats is not None:
            self._apply_stats(d, stats, now)
        if not d.ready:
            d.ready = True
            vm.up = True
            self.sink.on_session_start(vm, now)
            held, d.held = d.held, []
            for item in held:
                self._apply_event(d, *item)
        pending, d.unmatched = d.unmatched, []
        for name, data, time, span in pending:
            typed = typed_event(name, data, time, span, vm)
            vm.apply(typed)
            self.sink.on_event(vm, typed)

    def _new_vm(self, uuid: str) -> VMState:
        vm = VMState(
            key=f"libvirt:{uuid}",
            socket=self.uri,
            source="libvirt",
            static_labels=static_labels(self.config.libvirt.labels, self.uri),
        )
        vm.uuid = uuid
        vm.stream = self._inbox  # hang tracking advances it only as far as its events are handled
        return vm

    @staticmethod
    def _set_status(vm: VMState, stats: Mapping[str, Any]) -> None:
        state, reason = stats.get("state.state"), stats.get("state.reason")
        if isinstance(state, int) and isinstance(reason, int):
            vm.status = run_state(state, reason)

    def _apply_stats(self, d: _Domain, stats: Mapping[str, Any], now: float) -> None:
        vm = d.vm
        for target, bs in blockstats_by_target(stats).items():
            alias = d.targets.get(target)
            if alias is not None and alias in vm.disks:
                vm.blockstats[alias] = bs
        vm.changed(Part.STATS)
        self.sink.on_blockstats(vm, now)

    async def _poll(self, conn: Any) -> None:
        now = self.clock()
        for uuid, stats in await self._call("stats", all_stats, conn):
            d = self.domains.get(uuid)
            if d is not None and d.ready:
                self._set_status(d.vm, stats)
                self._apply_stats(d, stats, now)

    async def _poll_loop(self, conn: Any) -> None:
        interval = self.config.libvirt.poll_interval_seconds
        delay = interval * random.uniform(0.5, 1.0)
        while True:
            self._poll_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._poll_now.wait()
            delay = interval
            await self._poll(conn)

    async def _relist_loop(self, conn: Any, version: str) -> None:
        interval = self.config.libvirt.relist_interval_seconds
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.0))
            await self._relist(conn, version)

    async def _refresh_loop(self, conn: Any, version: str) -> None:
        """Reads the XML of domains that started, migrated in, or changed disks."""
        while True:
            await self._refresh_now.wait()
            self._refresh_now.clear()
            pending, self._refresh = self._refresh, set()
            for uuid in pending:
                await self._read_domain(conn, uuid, version)

    def _request_refresh(self, uuid: str) -> None:
        self._refresh.add(uuid)
        self._refresh_now.set()

    def _remove(self, uuid: str) -> None:
        d = self.domains.pop(uuid, None)
        if d is None:
            return
        now = self.clock()
        if d.ready:
            self.sink.on_session_end(d.vm, now, True)
        d.vm.end_session()
        self.sink.on_removed(d.vm, now)
        log.info("libvirt domain gone", extra={"vm": d.vm.vm, "uri": self.uri})

    # -- events (on the asyncio loop, in libvirt's order) ------------------------------

    def _on_item(self, item: tuple[Any, ...] | ErrorRun) -> None:
        if type(item) is ErrorRun:
            if item.session == self._session_id:
                span = (item.count, item.first, item.max_gap)
                self._on_qemu_event(item.uuid, "BLOCK_IO_ERROR", self._data(item.details), item.last, span)
            return
        assert type(item) is tuple
        kind, session = item[0], item[1]
        if session != self._session_id:
            return  # a callback of a connection already given up
        if kind == "qemu":
            _k, _s, uuid, name, seconds, micros, details = item
            self._on_qemu_event(uuid, name, self._data(details), event_time(seconds, micros))
        elif kind == "lifecycle":
            _k, _s, uuid, event, _detail = item
            if event in (_LIFECYCLE_STARTED, _LIFECYCLE_RESUMED) and uuid not in self.domains:
                self._request_refresh(uuid)  # started, or migrated in
            elif event in (_LIFECYCLE_STOPPED, _LIFECYCLE_CRASHED):
                self._remove(uuid)  # destroyed, shut off, or migrated out
            elif event in (_LIFECYCLE_SUSPENDED, _LIFECYCLE_RESUMED, _LIFECYCLE_SHUTDOWN):
                self._poll_now.set()
        elif kind == "device-added":
            if item[2] in self.domains:
                self._request_refresh(item[2])
        elif kind == "close":
            self._closed.set()

    def _data(self, details: Any) -> Any:
        """The event's data, parsed once per distinct text: a failing disk repeats the same
        text for every attempt (read-only downstream).  Bounded: cleared when full."""
        data = self._parsed.get(details) if type(details) is str else None
        if data is None:
            data = event_data(details)
            if type(details) is str and data is not None:
                if len(self._parsed) >= _PARSED_MAX:
                    self._parsed.clear()
                self._parsed[details] = data
        return data

    def _on_qemu_event(self, uuid: str, name: str, data: Any, time: float | None, span: Span = None) -> None:
        d = self.domains.get(uuid)
        if d is None:
            if len(self.domains) >= _MAX_DOMAINS:
                return
            # A domain not listed yet (it just started): hold its events until its XML is read.
            d = self.domains[uuid] = _Domain(self._new_vm(uuid))
            self._request_refresh(uuid)
        if not d.ready and len(d.held) < _HELD_PER_DOMAIN:
            d.held.append((name, data, time, span))
            return
        # (Beyond the bound an event is applied now: counted, as unmatched if it names a disk.)
        self._apply_event(d, name, data, time, span)

    def _apply_event(self, d: _Domain, name: str, data: Any, time: float | None, span: Span = None) -> None:
        vm = d.vm
        typed = typed_event(name, data, time, span, vm)
        if type(typed) is BlockIOError and typed.device is not None:
            # The storm's case, with the fewest steps (`received` and `apply` in one go).
            vm.received_io_error(typed)
            self.sink.on_event(vm, typed)
            return
        vm.received(typed)
        if (
            isinstance(typed, BlockIOError | BlockIOErrorRun)
            and typed.device is None
            and d.ready
            and len(d.unmatched) < _HELD_PER_DOMAIN
        ):
            d.unmatched.append((name, data, time, span))  # a disk hot-plugged since the XML read
            self._request_refresh(vm.uuid)
            return
        vm.apply(typed)
        self.sink.on_event(vm, typed)
        if isinstance(typed, RunStateChange):
            self._poll_now.set()
        elif typed.name == "DEVICE_DELETED":
            self._request_refresh(vm.uuid)
