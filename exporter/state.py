"""In-memory state of every watched VM: what QMP sessions write and what scrapes read.

Everything runs on one asyncio loop, so a scrape sees each VM as it was between two awaits of
its watcher: consistent without locks, and never waiting on QEMU.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from exporter.policy import DiskPolicy, PolicyVerdict

#: Event names counted by name in self-metrics; anything else is counted as "other" so a
#: misbehaving peer cannot blow up label cardinality.
KNOWN_EVENTS = frozenset(
    {
        "BLOCK_IO_ERROR",
        "STOP",
        "RESUME",
        "SHUTDOWN",
        "RESET",
        "POWERDOWN",
        "DEVICE_DELETED",
        "BLOCK_JOB_COMPLETED",
        "BLOCK_JOB_ERROR",
        "MIGRATION",
        "GUEST_PANICKED",
        "WATCHDOG",
        "SUSPEND",
        "WAKEUP",
        "RTC_CHANGE",
        "NIC_RX_FILTER_CHANGED",
    }
)

#: Only these operation/action values are used as labels; others (future QEMUs) become "other".
IO_OPERATIONS = frozenset({"read", "write"})
IO_ACTIONS = frozenset({"ignore", "report", "stop", "retry"})


#: Versions of VMState parts (see `VMState.version`): one counter for all, so that a version
#: never repeats, even across VMState objects.
_versions = itertools.count(1)

#: Fields whose assignment changes what a scrape shows about the VM's identity, run state and
#: disks (`VMState.version`), its counters (`counters_version`) and its blockstats
#: (`stats_version`).  In-place changes of the containers call `touch_counters`/`touch_stats`.
_IDENTITY_FIELDS = frozenset(
    {"socket", "static_labels", "up", "name", "uuid", "qemu_version", "status", "retry_feature", "disks"}
)
_COUNTER_FIELDS = frozenset(
    {
        "io_errors",
        "connect_attempts",
        "connect_errors",
        "disconnects",
        "command_errors",
        "events",
        "unmatched_io_errors",
        "internal_errors",
    }
)
_MISSING = object()


def bounded(value: object, allowed: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in allowed else "other"


@dataclass(frozen=True)
class Disk:
    """A guest disk as QMP describes it (query-block + qom-get)."""

    device: str  # qdev id, e.g. virtio-disk0 / scsi0-0-0-0: the `device` label
    drive: str  # query-block "device": the -drive id, "" with -blockdev
    node_name: str  # root node of the backend, what BLOCK_IO_ERROR names
    qdev: str  # query-block "qdev" as QEMU spells it
    qom_path: str  # where qom-get reads the policy
    qdev_type: str  # virtio-blk, scsi-hd, or the QOM type
    policy: DiskPolicy
    verdict: PolicyVerdict


@dataclass
class BlockStats:
    """One query-blockstats sample of a disk, in base units."""

    read_bytes: int = 0
    written_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0
    flush_ops: int = 0
    failed_read_ops: int = 0
    failed_write_ops: int = 0
    failed_flush_ops: int = 0
    read_time_s: float = 0.0
    write_time_s: float = 0.0
    flush_time_s: float = 0.0
    idle_s: float | None = None

    @property
    def ok_ops(self) -> int:
        """Successful operations: the only trace of recovery QEMU gives (domain.md §3.4)."""
        return self.read_ops + self.write_ops + self.flush_ops


@dataclass
class VMState:
    """Everything known about one QMP socket.

    Session data (identity, disks, stats) is cleared when the session ends so that a VM whose
    QEMU is gone leaves no stale series; counters live as long as the socket is watched.

    Scrapes render each VM's text only when it changed (`exporter.metrics`): ``version``,
    ``counters_version`` and ``stats_version`` change whenever a field of that part is assigned
    a different value (``__setattr__``); code that changes a container in place (a Counter,
    ``blockstats``) calls `touch_counters` or `touch_stats`.
    """

    socket: str
    static_labels: dict[str, str] = field(default_factory=dict)

    up: bool = False
    name: str | None = None
    uuid: str = ""
    qemu_version: str = ""
    status: str = ""
    retry_feature: bool | None = None
    disks: dict[str, Disk] = field(default_factory=dict)
    blockstats: dict[str, BlockStats] = field(default_factory=dict)

    # Counters (monotonic while the socket is watched).
    io_errors: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    connect_attempts: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    command_errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    unmatched_io_errors: int = 0
    internal_errors: int = 0  # bugs caught by the watcher (each also logged with a traceback)

    # Lookups from what BLOCK_IO_ERROR carries to the qdev id (rebuilt with the disk list).
    _by_node: dict[str, str] = field(default_factory=dict, repr=False)
    _by_drive: dict[str, str] = field(default_factory=dict, repr=False)
    _by_qom: dict[str, str] = field(default_factory=dict, repr=False)

    # Change versions for the scrape-time text cache (never equal for two different states).
    version: int = field(default=0, repr=False, compare=False)
    counters_version: int = field(default=0, repr=False, compare=False)
    stats_version: int = field(default=0, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _IDENTITY_FIELDS:
            if getattr(self, name, _MISSING) != value:
                object.__setattr__(self, "version", next(_versions))
        elif name in _COUNTER_FIELDS:
            object.__setattr__(self, "counters_version", next(_versions))
        elif name == "blockstats":
            object.__setattr__(self, "stats_version", next(_versions))
        object.__setattr__(self, name, value)

    def touch_counters(self) -> None:
        """A counter container (io_errors, events, ...) was changed in place."""
        object.__setattr__(self, "counters_version", next(_versions))

    def touch_stats(self) -> None:
        """``blockstats`` was changed in place."""
        object.__setattr__(self, "stats_version", next(_versions))

    @property
    def stem(self) -> str:
        base = os.path.basename(self.socket)
        root, _ext = os.path.splitext(base)
        return root or base

    @property
    def vm(self) -> str:
        """The `vm` label: QMP query-name when set, else the socket file's stem."""
        return self.name or self.stem

    def set_disks(self, disks: dict[str, Disk]) -> None:
        self.disks = disks
        self._by_node = {d.node_name: d.device for d in disks.values() if d.node_name}
        self._by_drive = {d.drive: d.device for d in disks.values() if d.drive}
        self._by_qom = {}
        for d in disks.values():
            self._by_qom[d.qom_path] = d.device
            self._by_qom[d.qdev] = d.device
        for dev in list(self.blockstats):
            if dev not in disks:
                del self.blockstats[dev]
                self.touch_stats()

    def match_disk(self, data: dict[str, object]) -> str | None:
        """Find the disk a BLOCK_IO_ERROR is about (node-name, then drive id, then qom-path)."""
        node = data.get("node-name")
        if isinstance(node, str) and node in self._by_node:
            return self._by_node[node]
        drive = data.get("device")
        if isinstance(drive, str) and drive in self._by_drive:
            return self._by_drive[drive]
        qom = data.get("qom-path")
        if isinstance(qom, str) and qom in self._by_qom:
            return self._by_qom[qom]
        return None

    def end_session(self) -> None:
        """Forget what only a live session can vouch for."""
        self.up = False
        self.uuid = ""
        self.qemu_version = ""
        self.status = ""
        self.retry_feature = None
        self.set_disks({})
        self.blockstats.clear()
        self.touch_stats()
