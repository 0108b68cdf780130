"""The hang journal: every completed hang as one JSON line in a durable, size-capped file.

What the exporter otherwise keeps of a hang is brief (the status page's recent hangs: 10 per
disk, one hour; Prometheus: the hang series at its scrape resolution), but the morning after an
outage is when the exact list matters: which guests saw IO errors (docs/incidents.md).  So each
hang, when it completes (`HangTracking.on_completed`), becomes a `HangRecord` line here.

File, cap and rotation
======================
``hang.journal_file`` (e.g. ``hangs.jsonl``) is appended to; before a line would take it past
``hang.journal_max_bytes`` (default 16 MiB, ~58,000 hangs) it is renamed to ``hangs.jsonl.1``
(replacing the previous one) and a new file is started.  So the journal takes at most twice the
cap on disk and keeps at least the latest cap's worth of hangs.

Durability
==========
Records are written in batches by a worker thread (`asyncio.to_thread`): a hang completing on
the event loop costs one small object there, never a write; the batch is serialised, written
and ``fsync``-ed in the thread, and a rotation ``fsync``-s the directory.  A record reaches the
disk within milliseconds of its hang's completion (completion itself is noticed at the hang
tracking's tick, every 0.5 s).  What a crash can lose: a ``SIGKILL`` the records not yet handed
to the kernel (the batch being written); a power loss the batch not yet ``fsync``-ed.  A write
that fails (disk full, read-only) is logged and retried every `RETRY_S` with the records kept,
up to `MAX_PENDING` of them (then the oldest are dropped and counted).

A line torn by a crash is never fatal: at start the journal is read through, a torn last line
is cut off the file (so that the next record starts on a line of its own) and every line that
is not a record is skipped and counted (``qemu_exporter_hang_journal_corrupt_lines_total``).

Reading
=======
The records of the last 24 h (at most `MAX_RECENT`) are kept in memory for the status page and
for queries within them; a query reaching further back reads the files, in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from exporter.config import DEFAULT_JOURNAL_MAX_BYTES
from exporter.hang.incidents import DEFAULT_WINDOW_S, HangRecord, Window, incidents_json, select
from exporter.hang.outcome import CompletedHang
from exporter.model.backend import UNKNOWN
from exporter.model.sink import EventSink
from exporter.model.state import VMState

log = logging.getLogger("exporter.hang.journal")

#: Records waiting for the disk (a failing write keeps them) before the oldest are dropped.
MAX_PENDING: Final[int] = 100_000
#: Seconds between attempts after a failed write.
RETRY_S: Final[float] = 5.0
#: Records kept in memory: those that ended in the last `DEFAULT_WINDOW_S`, at most this many.
MAX_RECENT: Final[int] = 50_000


class JournalError(Exception):
    """The journal file cannot be used (its directory is missing, not writable...)."""


@dataclass
class ReadResult:
    records: list[HangRecord]
    corrupt: int = 0
    #: Bytes of a torn last line cut off the file (`JournalFiles.load`).
    cut: int = 0


class JournalFiles:
    """The two files (``PATH`` and ``PATH.1``) and their format: blocking I/O, run in a thread
    by `HangJournal` (and directly by ``qemu-iohang-report --journal.file``).  A lock keeps a
    reader from seeing half a batch or a rotation in progress."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_JOURNAL_MAX_BYTES) -> None:
        self.path = path
        self.rotated = path + ".1"
        self.max_bytes = max_bytes
        self.lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------

    def read(self, keep: Callable[[HangRecord], bool] = lambda r: True) -> ReadResult:
        """Every record of both files (oldest file first) that ``keep`` accepts; lines that
        are not records are skipped and counted (a torn last line among them)."""
        out = ReadResult([])
        with self.lock:
            for path in (self.rotated, self.path):
                self._read_file(path, keep, out)
        return out

    @staticmethod
    def _read_file(path: str, keep: Callable[[HangRecord], bool], out: ReadResult) -> None:
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below; FileNotFoundError is normal)
        except FileNotFoundError:
            return
        with f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    r = HangRecord.from_json(orjson.loads(line))
                except (ValueError, orjson.JSONDecodeError):
                    out.corrupt += 1
                    continue
                if keep(r):
                    out.records.append(r)

    def load(self, keep: Callable[[HangRecord], bool]) -> ReadResult:
        """`read`, after cutting a torn last line (no newline: the write of it was cut short)
        off the current file, so that the next record starts on a line of its own.  The cut
        line counts as corrupt.  OSError when the file cannot be created or opened for writing
        (the exporter refuses to start)."""
        with self.lock:
            cut = self._cut_torn_tail()
        result = self.read(keep)
        result.cut = cut
        result.corrupt += 1 if cut else 0
        return result

    def _cut_torn_tail(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
                return 0
            # Back to the last newline, reading backwards in blocks.
            pos = size
            while pos > 0:
                start = max(0, pos - 65536)
                nl = os.pread(fd, pos - start, start).rfind(b"\n")
                if nl >= 0:
                    pos = start + nl + 1
                    break
                pos = start
            os.ftruncate(fd, pos)
            os.fsync(fd)
            return size - pos
        finally:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------

    def append(self, records: list[HangRecord]) -> int:
        """Write ``records`` (rotating by size), fsync; the number of bytes written."""
        lines = [orjson.dumps(r.to_json()) + b"\n" for r in records]
        written = 0
        with self.lock:
            f = open(self.path, "ab")  # noqa: SIM115 (reopened after a rotation)
            try:
                size = f.seek(0, os.SEEK_END)
                chunk: list[bytes] = []
                for line in lines:
                    if size and size + len(line) > self.max_bytes:
                        f.write(b"".join(chunk))
                        chunk = []
                        f.flush()
                        os.fsync(f.fileno())
                        f.close()
                        self._rotate()
                        f = open(self.path, "ab")  # noqa: SIM115
                        size = 0
                    chunk.append(line)
                    size += len(line)
                    written += len(line)
                f.write(b"".join(chunk))
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
        return written

    def _rotate(self) -> None:
        os.replace(self.path, self.rotated)
        directory = os.path.dirname(os.path.abspath(self.path))
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class HangJournal(EventSink):
    """Turns completed hangs into `HangRecord` lines (`completed`), writes them off the event
    loop, and answers queries.  As an `EventSink` it remembers each disk's identity (VM name,
    UUID, backend, source) when its disks are read: a hang that ends because its session ended
    is drained after the session forgot them (`VMState.end_session`)."""

    def __init__(self, path: str, max_bytes: int, clock: Callable[[], float]) -> None:
        self.files = JournalFiles(path, max_bytes)
        self._clock = clock
        #: VMState.key -> device -> (vm, uuid, backend, source)
        self._disks: dict[str, dict[str, tuple[str, str, str, str]]] = {}
        self._pending: list[HangRecord] = []
        self._flushing = False
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._failing = False
        # Counters (`collect`).
        self.written = 0
        self.write_errors = 0
        self.dropped = 0
        now = clock()
        horizon = now - DEFAULT_WINDOW_S
        try:
            result = self.files.load(lambda r: r.end >= horizon)
        except OSError as exc:
            raise JournalError(f"{path}: {exc.strerror or exc}") from None
        self.corrupt = result.corrupt
        if result.cut:
            log.warning(
                "cut a torn last line off the hang journal", extra={"path": path, "bytes": result.cut}
            )
        if result.corrupt:
            log.warning(
                "skipped unreadable hang journal lines", extra={"path": path, "lines": result.corrupt}
            )
        result.records.sort(key=lambda r: r.end)
        #: The records that ended in the last day, in journal order (at most `MAX_RECENT`).
        self._recent: deque[HangRecord] = deque(result.records[-MAX_RECENT:], maxlen=MAX_RECENT)
        #: Every record that ended after this is in `_recent`.
        self._complete_after = horizon
        if len(result.records) > MAX_RECENT:
            self._complete_after = result.records[-MAX_RECENT - 1].end
        #: Changes with `_recent` (the status page's incidents are cached on it).
        self.version = 0
        self._incidents: tuple[int, float, list[dict[str, Any]]] | None = None
        log.info("hang journal loaded", extra={"path": path, "records_last_day": len(self._recent)})

    # -- identity of disks (EventSink) ---------------------------------------------------

    def on_disks(self, vm: VMState, now: float) -> None:
        # Devices unplugged stay: their last hang may be drained later (a bounded leak).
        known = self._disks.setdefault(vm.key, {})
        for dev, disk in vm.disks.items():
            known[dev] = (vm.vm, vm.uuid, disk.backend or UNKNOWN, vm.source)

    def on_removed(self, vm: VMState, now: float) -> None:
        # After the hang tracking drained the VM's hangs (it is told first).
        self._disks.pop(vm.key, None)

    # -- writing ------------------------------------------------------------------------

    def completed(self, key: str, device: str, hang: CompletedHang, retry_timeout_s: float) -> None:
        """A hang completed (`HangTracking.on_completed`): queue its record, and write it soon
        from a thread.  O(1) on the loop."""
        vm, uuid, backend, source = self._disks.get(key, {}).get(device, (key, "", UNKNOWN, "qmp"))
        record = HangRecord(
            vm=vm,
            uuid=uuid,
            device=device,
            backend=backend,
            start=hang.start,
            end=hang.end,
            outcome=hang.outcome.value,
            retry_timeout_seconds=retry_timeout_s,
            io_error_events=hang.io_error_events,
            source=source,
        )
        if len(self._recent) == MAX_RECENT:
            self._complete_after = max(self._complete_after, self._recent[0].end)
        self._recent.append(record)
        self.version += 1
        self._pending.append(record)
        self._bound_pending()
        self._schedule()

    def _bound_pending(self) -> None:
        over = len(self._pending) - MAX_PENDING
        if over > 0:
            del self._pending[:over]
            self.dropped += over

    def _schedule(self) -> None:
        if self._flushing or self._retry is not None or not self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # fed synchronously (tools, tests): write now
            batch = self._take()
            self._written(batch, self._write(batch))
            return
        self._flushing = True
        self._task = loop.create_task(self._flush(), name="hang-journal")

    def _take(self) -> list[HangRecord]:
        batch, self._pending = self._pending, []
        return batch

    async def _flush(self) -> None:
        try:
            while self._pending and self._retry is None:
                batch = self._take()
                error = await asyncio.to_thread(self._write, batch)
                if not self._written(batch, error):
                    self._retry = asyncio.get_running_loop().call_later(RETRY_S, self._retry_now)
        finally:
            self._flushing = False

    def _retry_now(self) -> None:
        self._retry = None
        self._schedule()

    def _write(self, batch: list[HangRecord]) -> OSError | None:
        """Write ``batch`` (in a thread: nothing else here touches the journal's state)."""
        try:
            self.files.append(batch)
        except OSError as exc:
            return exc
        return None

    def _written(self, batch: list[HangRecord], error: OSError | None) -> bool:
        """Account for a write of ``batch`` (on the loop); a failed one puts the batch back in
        front of the queue, within `MAX_PENDING`."""
        if error is None:
            self.written += len(batch)
            if self._failing:
                log.info("hang journal writable again", extra={"path": self.files.path})
            self._failing = False
            return True
        self.write_errors += 1
        self._pending[:0] = batch
        self._bound_pending()
        if not self._failing:
            log.warning(
                "cannot write the hang journal, retrying",
                extra={"path": self.files.path, "err": str(error), "records": len(self._pending)},
            )
        self._failing = True
        return False

    async def close(self) -> None:
        """Write what is queued (the exporter is stopping)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            batch = self._take()
            self._written(batch, await asyncio.to_thread(self._write, batch))

    # -- reading ------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        horizon = now - DEFAULT_WINDOW_S
        recent = self._recent
        while recent and recent[0].end < horizon:
            self._complete_after = max(self._complete_after, recent.popleft().end)
            self.version += 1
        self._complete_after = max(self._complete_after, horizon)

    def recent(self, window: Window) -> list[HangRecord] | None:
        """The records in ``window`` from memory, or None when memory does not reach back to
        ``window.since``."""
        self._prune(self._clock())
        if window.since <= self._complete_after:
            return None
        return [r for r in self._recent if window.holds(r)]

    async def records(self, window: Window) -> list[HangRecord]:
        """Every record in ``window`` (unsorted): from memory, and from the files for what
        ended before memory reaches (read in a thread)."""
        got = self.recent(window)
        if got is not None:
            return got
        after = self._complete_after
        older = await asyncio.to_thread(self.files.read, lambda r: window.holds(r) and r.end <= after)
        return older.records + [r for r in self._recent if r.end > after and window.holds(r)]

    def incidents_last_day(self) -> list[dict[str, Any]]:
        """The incidents of the last 24 h (the status page), recomputed when a record came
        or left, or at most once a minute."""
        now = self._clock()
        self._prune(now)
        cached = self._incidents
        if cached is not None and cached[0] == self.version and now - cached[1] < 60:
            return cached[2]
        window = Window(now - DEFAULT_WINDOW_S, now)
        result = incidents_json(select(self._recent, window))
        self._incidents = (self.version, now, result)
        return result
