"""Socket discovery: which QMP sockets exist right now, and one watcher for each.

Polling the file system once a second is simpler and more robust than inotify on /run (no
watch limits, works on any file system, survives the directory being re-created) and is cheap:
one ``glob`` and one ``stat`` per socket.

* A socket found by a glob that disappears takes its VM's series with it.
* An explicitly configured socket is always watched: while it is missing the VM shows
  `exporter.metrics.QMP_UP` 0, because an operator said it should exist.
* A socket file that is re-created (new inode: QEMU restarted) wakes its watcher at once
  instead of letting it finish its backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import stat
from collections.abc import Callable

from exporter.config import Config, static_labels
from exporter.model.sink import EventSink
from exporter.model.state import VMState
from exporter.qmp_watch import VMWatcher
from exporter.runtime.fairness import ScrapeFirst
from exporter.runtime.fd_limit import FD_LIMIT, session_budget
from exporter.storage import BackendResolver

log = logging.getLogger("exporter.qmp.discovery")


def socket_identity(path: str) -> tuple[int, int, int] | None:
    """(device, inode, ctime) of a unix socket at ``path``, None when there is none.

    The ctime matters: the kernel readily reuses the inode number of a socket QEMU re-creates.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def unmatched_reason(pattern: str) -> str | None:
    """Why a glob may match nothing, when the file system can tell: its directory is missing or
    not readable by this user (``glob`` says neither; it just finds nothing)."""
    directory = os.path.dirname(pattern)
    if not directory or any(c in directory for c in "*?["):
        return None
    if not os.path.isdir(directory):
        return f"{directory} does not exist"
    if not os.access(directory, os.R_OK | os.X_OK):
        return f"{directory} is not readable by this user"
    return None


def static_label_names(config: Config) -> tuple[str, ...]:
    """Names of the static labels ``config`` gives some sockets (every VM gets them all)."""
    every = [*config.qmp.labels.values(), *config.libvirt.labels.values()]
    return tuple(sorted({k for lbls in every for k in lbls}))


#: Sessions being set up (identity, disks, policies: ~28 commands) at the same time.  When a
#: whole fleet connects at once, every VM in flight holds its commands, replies and tasks; at
#: 1000 VMs that peak left ~190 MB resident for ~50 MB of live data (freed small objects stay in
#: Python's partly used arenas).  32 at a time keeps both processes busy (hundreds of
#: commands in flight) and connects the fleet as fast: 1000 VMs in 3.9 s, RSS 124 MB.
#: Connecting and the greeting are outside the limit, so sockets that never answer hold no slot.
SETUP_CONCURRENCY = 32


class Discovery:
    """Keeps one `VMWatcher` per discovered socket."""

    def __init__(
        self,
        config: Config,
        sink: EventSink,
        clock: Callable[[], float],
        scrape_first: ScrapeFirst | None = None,
        backends: BackendResolver | None = None,
        max_sessions: int | None = None,
    ) -> None:
        self.config = config
        self.scrape_first = scrape_first
        #: QMP sessions the open-file limit leaves room for (`exporter.runtime.fd_limit`).
        self.max_sessions = session_budget() if max_sessions is None else max_sessions
        #: Sockets found but not watched for want of descriptors, in the order found.
        self._over_limit: dict[str, None] = {}
        self._waiting_logged = 0
        self._announced = False
        # One resolver (one mount table, read once per refresh interval) for every watcher.
        self.backends = backends or BackendResolver(config)
        self.sink = sink
        self.clock = clock
        self.watchers: dict[str, VMWatcher] = {}
        self._identity: dict[str, tuple[int, int, int] | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._setup_slots = asyncio.Semaphore(SETUP_CONCURRENCY)

    @property
    def vms(self) -> list[VMState]:
        return [w.vm for w in self.watchers.values()]

    def scan(self) -> dict[str, tuple[int, int, int] | None]:
        """Sockets that should be watched now, with their identity (None: missing)."""
        explicit, globs = self.config.socket_patterns()
        found: dict[str, tuple[int, int, int] | None] = {}
        for pattern in globs:
            for path in glob.glob(pattern):
                ident = socket_identity(path)
                if ident is not None:
                    found[os.path.abspath(path)] = ident
        for path in explicit:
            ap = os.path.abspath(path)
            found[ap] = socket_identity(ap)
        return found

    def _announce(self, found: dict[str, tuple[int, int, int] | None]) -> None:
        """One line at the first scan: which globs and sockets are watched, and when none is
        there yet, that and why it may be so.  (Each socket found later is logged by `sync`.)"""
        explicit, globs = self.config.socket_patterns()
        present = sum(1 for ident in found.values() if ident is not None)
        fields: dict[str, object] = {"globs": ",".join(globs), "sockets": ",".join(explicit)}
        if present:
            log.info("watching QMP sockets", extra={**fields, "found": present})
            return
        reasons = [r for r in map(unmatched_reason, globs) if r is not None]
        if reasons:
            fields["reason"] = "; ".join(reasons)
        fields["interval_seconds"] = self.config.qmp.discovery_interval_seconds
        log.info("no QMP socket found yet: watching for them", extra=fields)

    async def sync(self) -> None:
        found = self.scan()
        if not self._announced:
            self._announced = True
            self._announce(found)
        for path in list(self.watchers):
            if path not in found:
                watcher = self.watchers.pop(path)
                self._identity.pop(path, None)
                self._over_limit.pop(path, None)
                log.info("QMP socket gone", extra={"vm": watcher.vm.vm, "socket": path})
                await watcher.stop()
                self.sink.on_removed(watcher.vm, self.clock())
        for path, ident in found.items():
            existing = self.watchers.get(path)
            if existing is None:
                vm = VMState.qmp(path, static_labels(self.config.qmp.labels, path))
                watcher = VMWatcher(
                    vm,
                    self.config,
                    sink=self.sink,
                    clock=self.clock,
                    setup_slots=self._setup_slots,
                    scrape_first=self.scrape_first,
                    backends=self.backends,
                )
                self.watchers[path] = watcher
                self._identity[path] = ident
                # A configured socket is watched even while missing: say which it is.
                log.info(
                    "QMP socket found" if ident else "QMP socket missing: watching for it",
                    extra={"socket": path},
                )
                self._over_limit[path] = None
            elif ident != self._identity.get(path):
                self._identity[path] = ident
                if ident is not None:
                    existing.poke()
        self._start_within_fd_limit()

    def _start_within_fd_limit(self) -> None:
        """Start the watchers of new sockets while the open-file limit leaves room; the others
        wait, shown down with reason ``fd_limit``, until sockets go away (`exporter.runtime.fd_limit`:
        descriptors beyond the limit would leave none to accept a scrape)."""
        room = self.max_sessions - (len(self.watchers) - len(self._over_limit))
        waiting = 0
        for path in list(self._over_limit):
            watcher = self.watchers[path]
            if room > 0:
                room -= 1
                del self._over_limit[path]
                if watcher.vm.last_connect_error == FD_LIMIT:
                    watcher.vm.last_connect_error = ""
                watcher.start()
            else:
                waiting += 1
                if watcher.vm.last_connect_error != FD_LIMIT:
                    watcher.vm.last_connect_error = FD_LIMIT
        if waiting and waiting != self._waiting_logged:  # a line per change, not per scan
            log.error(
                "QMP sockets not watched: the open-file limit is reached (raise LimitNOFILE)",
                extra={"waiting": waiting, "watched": len(self.watchers) - waiting, "max": self.max_sessions},
            )
        self._waiting_logged = waiting

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # a broken glob or fs error must not end discovery
                log.exception("socket discovery failed")
            await asyncio.sleep(self.config.qmp.discovery_interval_seconds)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(w.stop() for w in self.watchers.values()))
        self.watchers.clear()
