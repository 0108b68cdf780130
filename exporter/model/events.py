"""Typed, source-neutral VM events.

A QMP socket and libvirt's monitor-event forwarding deliver the same QEMU events (name, data,
QEMU's timestamp: domain.md §3, §4.1).  Each source decodes them once, here, into one of three
small immutable objects, and everything downstream (the VM state, hang tracking, metrics) works
on those: no raw dicts, no source-specific shapes.

Every value that can become a label is bounded to a closed set, so a misbehaving peer cannot
blow up cardinality.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

#: Event names counted by name in self-metrics; anything else is counted as "other".
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

#: Events that change the run state (and after which a source re-reads it).
RUN_STATE_EVENTS = frozenset({"STOP", "RESUME", "SHUTDOWN", "RESET", "SUSPEND", "WAKEUP"})


def bounded(value: object, allowed: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in allowed else "other"


def event_time(seconds: object, microseconds: object) -> float | None:
    """QEMU's event timestamp (host real-time clock) in Unix seconds, None when unusable.

    QEMU uses -1/-1 when it has no clock; absurd values (and JSON integers beyond any float)
    are unknown too."""
    if (
        not isinstance(seconds, int)
        or not isinstance(microseconds, int)
        or isinstance(seconds, bool)
        or not (0 <= seconds < 2**40 and 0 <= microseconds < 10**6)
    ):
        return None
    return seconds + microseconds / 1e6


class BlockIOError(NamedTuple):
    """``BLOCK_IO_ERROR``: one failed attempt of one request (domain.md §3).

    A NamedTuple, not a frozen dataclass like the others: one is built per event, tens of
    thousands a second in a storm, and a frozen dataclass's ``__init__`` (``object.__setattr__``
    per field) took 0.62 us where this takes 0.24 (docs/performance-history.md)."""

    time: float | None
    #: The disk's device id (the ``device`` label); None when it matched no known disk.
    device: str | None
    operation: str  # read | write | other
    action: str  # ignore | report | stop | retry | other
    name: str = "BLOCK_IO_ERROR"


class BlockIOErrorRun(NamedTuple):
    """``events`` `BlockIOError`s of one disk with the same operation and action, handed over as
    one: the libvirt source coalesces them while the exporter is behind in reading
    (`exporter.libvirt.inbox.EventInbox`), so that an outage longer than what the exporter can
    read costs it memory per disk, not per event.  Counts, the first and the last timestamp are
    exact; of the times in between only the largest gap between consecutive ones is kept (what
    hang tracking needs: `exporter.hang.machine.DiskHangTracker.on_io_errors`)."""

    time: float  # the last one's
    device: str | None
    operation: str
    action: str
    events: int  # how many: ``count`` is a tuple's method
    first: float
    max_gap: float
    name: str = "BLOCK_IO_ERROR"


@dataclass(frozen=True, slots=True)
class RunStateChange:
    """STOP, RESUME, SHUTDOWN, RESET, SUSPEND or WAKEUP."""

    time: float | None
    name: str


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """Any other event, kept for the per-name event counter (``name`` already bounded)."""

    time: float | None
    name: str


VMEvent = BlockIOError | BlockIOErrorRun | RunStateChange | OtherEvent


def decode(
    name: object,
    data: object,
    time: float | None,
    match_disk: Callable[[Mapping[str, object]], str | None],
) -> BlockIOError | RunStateChange | OtherEvent:
    """One QEMU event as a typed event.  ``match_disk`` finds the disk a BLOCK_IO_ERROR's data
    names (`VMState.match_disk`); a malformed event becomes an `OtherEvent` named "other"."""
    if name == "BLOCK_IO_ERROR":
        d: Mapping[str, Any] = data if isinstance(data, dict) else {}
        return BlockIOError(
            time,
            match_disk(d),
            bounded(d.get("operation"), IO_OPERATIONS),
            bounded(d.get("action"), IO_ACTIONS),
        )
    if isinstance(name, str) and name in RUN_STATE_EVENTS:
        return RunStateChange(time, name)
    return OtherEvent(time, bounded(name, KNOWN_EVENTS))


def status_after(event: str, status: str) -> str:
    """Best immediate guess of the run state after ``event``; sources confirm it right after."""
    if event == "STOP":
        return status if status == "io-error" else "paused"
    if event == "RESUME":
        return "running"
    if event == "SHUTDOWN":
        return "shutdown"
    if event == "SUSPEND":
        return "suspended"
    return status
