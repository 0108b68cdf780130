"""In-memory state of every watched VM: what QMP sessions write and what scrapes read.

Everything runs on one asyncio loop, so a scrape sees each VM as it was between two awaits of
its watcher: consistent without locks, and never waiting on QEMU.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol, TypeGuard

from exporter.model.backend import UNKNOWN
from exporter.model.events import BlockIOError, BlockIOErrorRun, RunStateChange, VMEvent, status_after
from exporter.model.policy import DiskPolicy, PolicyVerdict

#: Versions of VMState parts (see `VMState.changed`): one counter for all, so that a version
#: never repeats, even across VMState objects.
_versions = itertools.count(1)


class Part(IntEnum):
    """The parts of a VM's state that a scrape shows, each rendered again only when it changed
    (`exporter.metrics`)."""

    IDENTITY = 0  # identity, run state, disks and their policy: also every label of the VM
    COUNTERS = 1  # counters
    STATS = 2  # the latest blockstats sample


#: The part of the state each field belongs to: assigning it says `VMState.changed`.
_PART_OF = {
    **dict.fromkeys(
        (
            "socket",
            "static_labels",
            "source",
            "up",
            "name",
            "uuid",
            "qemu_version",
            "status",
            "retry_feature",
            "disks",
        ),
        Part.IDENTITY,
    ),
    **dict.fromkeys(
        (
            "io_errors",
            "connect_attempts",
            "connect_errors",
            "disconnects",
            "command_errors",
            "events",
            "unmatched_io_errors",
            "internal_errors",
            "blind_intervals",
            "blind_seconds",
        ),
        Part.COUNTERS,
    ),
    "blockstats": Part.STATS,
}
_VERSION_OF = {Part.IDENTITY: "version", Part.COUNTERS: "counters_version", Part.STATS: "stats_version"}
_MISSING = object()


class StreamClock(Protocol):
    """How far a VM's event stream has been read (`ReadOnlyQMPClient.read_through`)."""

    def read_through(self, now: float) -> float:
        """The time up to which every event QEMU wrote has been handled (at most ``now``)."""
        ...


@dataclass(frozen=True)
class Disk:
    """A guest disk as its source describes it (QMP: query-block + qom-get; libvirt: the live
    domain XML)."""

    device: str  # qdev id, e.g. virtio-disk0 / scsi0-0-0-0: the `device` label
    drive: str  # query-block "device": the -drive id, "" with -blockdev
    node_name: str  # root node of the backend, what BLOCK_IO_ERROR names
    qdev: str  # query-block "qdev" as QEMU spells it
    qom_path: str  # where qom-get reads the policy
    qdev_type: str  # virtio-blk, scsi-hd, or the QOM type
    policy: DiskPolicy
    verdict: PolicyVerdict
    #: Further node names that events may name for this disk (libvirt's -blockdev chain has
    #: a ``libvirt-N-format`` node above ``libvirt-N-storage``).
    other_nodes: tuple[str, ...] = ()
    #: The storage backend: what fails together with this disk (`exporter.model.backend`).
    backend: str = UNKNOWN


def is_uint64(v: object) -> TypeGuard[int]:
    """A counter as QEMU or libvirt may send it: an unsigned 64-bit integer (JSON allows
    10**400, which no float holds; a bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64


def uint64(values: Mapping[str, Any], key: str) -> int:
    """``values[key]`` when it is such a counter, else 0 (a missing or malformed sample)."""
    v = values.get(key, 0)
    return v if is_uint64(v) else 0


@dataclass
class BlockStats:
    """One query-blockstats sample of a disk, in base units (from QMP or libvirt: `uint64`)."""

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
    """Everything known about one VM, whichever source watches it.

    Four names, one job each: ``key`` identifies the VM in the exporter's own bookkeeping (hang
    state file, caches): the QMP socket path, or ``libvirt:<uuid>``; ``socket`` is what the
    ``socket`` label of `exporter.metrics.VM_INFO` shows (the QMP socket, or the libvirt URI);
    ``name`` is the VM's own name (QMP ``query-name``, the libvirt domain's), None until known;
    ``vm`` is the ``vm`` label every series carries (``name``, else the socket file's stem).

    Session data (identity, disks, stats) is cleared when the session ends so that a VM whose
    QEMU is gone leaves no stale series; counters live as long as the socket is watched.

    Scrapes render each part of a VM's text (`Part`) only when it changed: `changed` is the one
    way to say so.  Assigning a field calls it for the field's part (an identity field only when
    its value differs); code that changes a container in place (a Counter, ``blockstats``)
    calls it itself.
    """

    key: str
    socket: str = ""
    source: str = "qmp"
    static_labels: dict[str, str] = field(default_factory=dict)

    up: bool = False
    name: str | None = None
    uuid: str = ""
    qemu_version: str = ""
    status: str = ""
    retry_feature: bool | None = None
    disks: dict[str, Disk] = field(default_factory=dict)
    blockstats: dict[str, BlockStats] = field(default_factory=dict)
    #: Disks whose IO status said "failed" when the disk list was read (QMP ``io-status``,
    #: libvirt ``diskErrors``).  Meaningful only while the VM is paused on ``io-error``: with
    #: ``-blockdev`` QEMU leaves it "failed" after a successful ``cont`` (domain.md §3).
    io_failed: frozenset[str] = frozenset()

    # Counters (monotonic while the socket is watched).
    io_errors: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    connect_attempts: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    command_errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    unmatched_io_errors: int = 0
    internal_errors: int = 0  # bugs caught by the watcher (each also logged with a traceback)
    #: Intervals in which this VM's events could not be seen (its session was down while the VM
    #: may have run: `exporter.runtime.blind`), and their total length in seconds.
    blind_intervals: int = 0
    blind_seconds: float = 0.0
    #: Reason of the latest failed connect ("" after a session started): why a VM is down.
    last_connect_error: str = ""

    # Lookups from what BLOCK_IO_ERROR carries to the qdev id (rebuilt with the disk list).
    _by_node: dict[str, str] = field(default_factory=dict, repr=False)
    _by_drive: dict[str, str] = field(default_factory=dict, repr=False)
    _by_qom: dict[str, str] = field(default_factory=dict, repr=False)

    #: How far the VM's events are handled (the QMP session's reader, libvirt's event hand-over),
    #: None without a session: `read_through` is then ``now``.
    stream: StreamClock | None = field(default=None, repr=False, compare=False)

    # Versions of the parts (`changed`): never equal for two different states.
    version: int = field(default=0, repr=False, compare=False)
    counters_version: int = field(default=0, repr=False, compare=False)
    stats_version: int = field(default=0, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        part = _PART_OF.get(name)
        if part is not None and (part is not Part.IDENTITY or getattr(self, name, _MISSING) != value):
            self.changed(part)
        object.__setattr__(self, name, value)

    def changed(self, part: Part) -> None:
        """What a scrape shows of ``part`` changed."""
        object.__setattr__(self, _VERSION_OF[part], next(_versions))

    @staticmethod
    def version_attr(part: Part) -> str:
        """The attribute that holds the version of ``part``."""
        return _VERSION_OF[part]

    @classmethod
    def qmp(cls, path: str, static_labels: dict[str, str] | None = None) -> VMState:
        """The state of a VM watched through its QMP socket at ``path``."""
        return cls(key=path, socket=path, static_labels=static_labels or {})

    @property
    def vm(self) -> str:
        """The `vm` label: the VM's own name when known, else its socket file's stem."""
        if self.name:
            return self.name
        base = os.path.basename(self.socket or self.key)
        root, _ext = os.path.splitext(base)
        return root or base

    def read_through(self, now: float) -> float:
        """The time up to which this VM's events are known to be handled: silence up to there
        is silence, beyond it may be events not read yet (a reader behind in a storm)."""
        stream = self.stream
        return now if stream is None else stream.read_through(now)

    def set_disks(self, disks: dict[str, Disk]) -> None:
        self.disks = disks
        self._by_node = {d.node_name: d.device for d in disks.values() if d.node_name}
        for d in disks.values():
            self._by_node.update(dict.fromkeys(d.other_nodes, d.device))
        self._by_drive = {d.drive: d.device for d in disks.values() if d.drive}
        self._by_qom = {}
        for d in disks.values():
            self._by_qom[d.qom_path] = d.device
            self._by_qom[d.qdev] = d.device
        for dev in list(self.blockstats):
            if dev not in disks:
                del self.blockstats[dev]
                self.changed(Part.STATS)

    def match_disk(self, data: Mapping[str, object]) -> str | None:
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

    def received(self, event: VMEvent) -> None:
        """Count ``event`` by name, as it arrives (`apply` may come later)."""
        self.events[event.name] += event.events if type(event) is BlockIOErrorRun else 1
        self.changed(Part.COUNTERS)

    def received_io_error(self, event: BlockIOError) -> None:
        """`received` and `apply` of a `BlockIOError` that matched a disk, at once: the event
        path's common case in a storm (one version bump instead of two)."""
        self.events[event.name] += 1
        assert event.device is not None
        self.io_errors[(event.device, event.operation, event.action)] += 1
        if event.action == "stop":
            self.status = "io-error"  # QEMU enters io-error before it sends STOP
        self.changed(Part.COUNTERS)

    def apply(self, event: VMEvent) -> None:
        """Apply what ``event`` says: IO errors by disk, the run state.  A `BlockIOError` that
        names no known disk counts as unmatched (sources first try a fresh disk list)."""
        if isinstance(event, BlockIOError | BlockIOErrorRun):
            n = event.events if type(event) is BlockIOErrorRun else 1
            if event.device is None:
                self.unmatched_io_errors += n
            else:
                self.io_errors[(event.device, event.operation, event.action)] += n
                if event.action == "stop":
                    self.status = "io-error"  # QEMU enters io-error before it sends STOP
        elif isinstance(event, RunStateChange):
            self.status = status_after(event.name, self.status)
        self.changed(Part.COUNTERS)

    def end_session(self) -> None:
        """Forget what only a live session can vouch for."""
        self.up = False
        self.uuid = ""
        self.qemu_version = ""
        self.status = ""
        self.retry_feature = None
        self.io_failed = frozenset()
        self.set_disks({})
        self.blockstats.clear()
        self.changed(Part.STATS)


@dataclass
class ConnectionState:
    """One connection to a management daemon (libvirtd) that watches many VMs: what a scrape
    shows about it (`exporter.metrics.LIBVIRT_UP` and its error counters)."""

    uri: str
    up: bool = False
    connect_errors: Counter[str] = field(default_factory=Counter)
    call_errors: Counter[tuple[str, str]] = field(default_factory=Counter)


def one_per_vm(qmp: list[VMState], libvirt: list[VMState]) -> list[VMState]:
    """Each VM once (its ``vm`` label must name one series).  A VM seen both through libvirt
    and through a second QMP monitor (same UUID, or same name) is reported by its QMP session
    while that is up (it reads the policy from QEMU itself), else by libvirt."""
    up = [vm for vm in qmp if vm.up]
    up_uuids, up_names = {vm.uuid for vm in up if vm.uuid}, {vm.vm for vm in up}
    via_libvirt = [vm for vm in libvirt if vm.uuid not in up_uuids and vm.vm not in up_names]
    libvirt_names = {vm.vm for vm in via_libvirt}
    return [vm for vm in qmp if vm.up or vm.vm not in libvirt_names] + via_libvirt
