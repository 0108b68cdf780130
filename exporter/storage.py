"""The edge of the backend derivation: reads the mount table, applies the configured rules.

`exporter.model.backend` is pure; this is where ``/proc/self/mountinfo`` (or the configured
file) is read -- at most once per ``mounts.refresh_interval_seconds``, on the event loop (a few
kilobytes of procfs, microseconds) -- so that a disk whose image directory gets an NFS mount,
or loses it, shows the new backend at its next disk refresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from exporter.config import Config
from exporter.model.backend import DiskSource, derive_backend
from exporter.model.mounts import Mount, parse_mountinfo

log = logging.getLogger("exporter.storage")


class MountTable:
    """The parsed mount table, re-read when older than ``refresh_s``.  An unreadable file gives
    an empty table (local disks then show ``unknown``) and one log line per change."""

    def __init__(self, path: str, refresh_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.refresh_s = refresh_s
        self._clock = clock
        self._mounts: tuple[Mount, ...] = ()
        self._read_at: float | None = None
        self._error: str | None = None

    def mounts(self) -> tuple[Mount, ...]:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            self._read_at = now
            self._mounts = self._read()
        return self._mounts

    def _read(self) -> tuple[Mount, ...]:
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as exc:
            if self._error != str(exc):
                log.warning("cannot read the mount table", extra={"path": self.path, "err": str(exc)})
                self._error = str(exc)
            return ()
        self._error = None
        return parse_mountinfo(text)


class BackendResolver:
    """A disk source's backend label, with this exporter's rules and mount table."""

    def __init__(self, config: Config, mounts: MountTable | None = None) -> None:
        self.rules = config.backends
        self.table = mounts or MountTable(config.mounts.file, config.mounts.refresh_interval_seconds)

    def backend(self, source: DiskSource) -> str:
        mounts = self.table.mounts() if source.backend is None else ()
        return derive_backend(source, mounts, self.rules)
