"""Completed hangs as records, and hangs grouped into storage incidents: pure, no I/O, no clock.

The morning after a storage outage the questions are: which storage failed, from when to when,
how many disks and VMs hung, and **which guests saw IO errors** (their hang outlasted
``retry_timeout``), so that those VMs, and only those, get a filesystem check or a reboot.  The
hang journal (`exporter.hang.journal`) keeps one `HangRecord` per completed hang; this module
turns records into answers, for ``/api/v1/hangs``, ``/api/v1/incidents``, the status page and
``qemu-iohang-report``, so that all of them agree by construction.

Incidents
=========
Hangs on one storage backend belong to one incident when they overlap, or when one starts at
most `INCIDENT_GAP_S` (60 s) after the incident's hangs so far have ended.  The gap joins a
backend that flaps (down, back for half a minute, down again) into one outage, which is how an
operator files it; two failures of the same storage more than a minute apart are two incidents.
Per incident each disk is counted once, by the worst way one of its hangs ended: ``timed_out``
(the guest saw IO errors) before ``vm_gone`` before ``recovered``; so ``disks = recovered +
timed_out + vm_gone``.  ``guests_saw_errors`` lists the disks that timed out with ``at``, when
their guest got its first error: the end of the disk's first timed-out hang in the incident,
which is QEMU's timestamp of the ``report`` event.

Windows
=======
``since``/``until`` are a Unix time (``1717243200``), an RFC 3339 time with a zone
(``2024-06-01T12:00:00Z``) or a duration before ``now`` (``90s``, ``2h``, ``1h30m``, ``7d``);
the default window is the last 24 h.  A hang is in a window when it overlaps it (it ended at or
after ``since`` and started at or before ``until``); an incident is built from the hangs in the
window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from exporter.hang.outcome import HangOutcome

#: Hangs of one backend whose start is at most this long after the end of the incident's hangs
#: so far belong to that incident (see the module docstring).
INCIDENT_GAP_S: Final[float] = 60.0

#: The default report window: the last day.
DEFAULT_WINDOW_S: Final[float] = 86400.0

SCHEMA: Final[int] = 1

SOURCES: Final[tuple[str, ...]] = ("qmp", "libvirt")
OUTCOMES: Final[tuple[str, ...]] = tuple(o.value for o in HangOutcome)

#: A disk's place in an incident, worst first (`Incident.disk_outcomes`).
_SEVERITY: Final[dict[str, int]] = {"timed_out": 0, "vm_gone": 1, "recovered": 2}


@dataclass(frozen=True, slots=True)
class HangRecord:
    """One completed hang, as the journal keeps it (one JSON line, `to_json`).

    Times are Unix seconds from QEMU's event timestamps where QEMU gave them: ``start`` is the
    first failed attempt's ``BLOCK_IO_ERROR``, a ``timed_out`` hang's ``end`` the ``report``
    event's; a ``recovered`` hang's end is the exporter's estimate (QEMU announces no recovery,
    docs/hangs.md), a ``vm_gone`` hang's the moment QEMU or its session went.  ``host`` is not
    part of the journal: the fleet report sets it to the exporter a record was read from."""

    vm: str
    uuid: str
    device: str
    backend: str
    start: float
    end: float
    outcome: str
    retry_timeout_seconds: float
    io_error_events: int
    source: str
    host: str | None = field(default=None, compare=False)

    @property
    def duration_seconds(self) -> float:
        return max(0.0, self.end - self.start)

    def to_json(self) -> dict[str, Any]:
        """The journal's and the API's object, keys in the documented order."""
        doc: dict[str, Any] = {
            "vm": self.vm,
            "uuid": self.uuid,
            "device": self.device,
            "backend": self.backend,
            "start": self.start,
            "end": self.end,
            "duration_seconds": self.duration_seconds,
            "outcome": self.outcome,
            "retry_timeout_seconds": self.retry_timeout_seconds,
            "io_error_events": self.io_error_events,
            "source": self.source,
        }
        if self.host is not None:
            doc["host"] = self.host
        return doc

    @classmethod
    def from_json(cls, doc: object, host: str | None = None) -> HangRecord:
        """`to_json`'s object back; ValueError naming the first field that is not as written
        (a line from another program, or edited by hand)."""
        if not isinstance(doc, Mapping):
            raise ValueError("not a JSON object")
        start, end = _number(doc, "start"), _number(doc, "end")
        if end < start:
            raise ValueError("end is before start")
        outcome = _text(doc, "outcome")
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {list(OUTCOMES)}")
        events = doc.get("io_error_events")
        if isinstance(events, bool) or not isinstance(events, int) or events < 0:
            raise ValueError("io_error_events is not a count")
        timeout = _number(doc, "retry_timeout_seconds")
        if timeout < 0:
            raise ValueError("retry_timeout_seconds is negative")
        return cls(
            vm=_text(doc, "vm"),
            uuid=_text(doc, "uuid", empty=True),
            device=_text(doc, "device"),
            backend=_text(doc, "backend"),
            start=start,
            end=end,
            outcome=outcome,
            retry_timeout_seconds=timeout,
            io_error_events=events,
            source=_text(doc, "source"),
            host=host,
        )


def _number(doc: Mapping[str, Any], key: str) -> float:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{key} is not a finite number")
    return float(v)


def _text(doc: Mapping[str, Any], key: str, *, empty: bool = False) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or (not v and not empty):
        raise ValueError(f"{key} is not a {'' if empty else 'non-empty '}string")
    return v


# --- windows -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """``[since, until]``, Unix seconds."""

    since: float
    until: float

    def holds(self, r: HangRecord) -> bool:
        """``r`` overlaps the window."""
        return r.end >= self.since and r.start <= self.until


_UNITS: Final[dict[str, float]] = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIX = re.compile(r"\d+(?:\.\d+)?")


def parse_time(name: str, text: str, now: float) -> float:
    """A ``since``/``until`` value as Unix seconds (module docstring); ValueError naming
    ``name`` and saying what is accepted."""
    t = text.strip()
    if _UNIX.fullmatch(t):
        value = float(t)
    elif _DURATION.fullmatch(t):
        value = now - sum(float(n) * _UNITS[u] for n, u in _PART.findall(t))
    else:
        try:
            parsed = datetime.fromisoformat(t)
        except ValueError:
            raise ValueError(
                f"{name}: {text!r} is neither a Unix time (1717243200), an RFC 3339 time "
                "(2024-06-01T12:00:00Z) nor a duration before now (90s, 2h, 1h30m, 7d)"
            ) from None
        if parsed.tzinfo is None:
            raise ValueError(f"{name}: {text!r} has no time zone (add Z or +hh:mm)")
        value = parsed.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{name}: {text!r} is out of range")
    return value


def parse_window(since: str | None, until: str | None, now: float) -> Window:
    """The window of ``since``/``until`` (each None: the default, the last 24 h up to now)."""
    lo = now - DEFAULT_WINDOW_S if since is None else parse_time("since", since, now)
    hi = now if until is None else parse_time("until", until, now)
    if lo > hi:
        raise ValueError(f"since ({lo:.3f}) is after until ({hi:.3f})")
    return Window(lo, hi)


def select(
    records: Iterable[HangRecord],
    window: Window,
    backend: str | None = None,
    outcome: str | None = None,
) -> list[HangRecord]:
    """The records in ``window`` (of ``backend``, with ``outcome`` when given), newest first:
    latest start first, then latest end."""
    out = [
        r
        for r in records
        if window.holds(r)
        and (backend is None or r.backend == backend)
        and (outcome is None or r.outcome == outcome)
    ]
    out.sort(key=lambda r: (r.start, r.end, r.vm, r.device), reverse=True)
    return out


# --- incidents -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuestError:
    """A disk whose guest saw IO errors in an incident, first ``at`` (the timeout)."""

    vm: str
    uuid: str
    device: str
    at: float
    host: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"vm": self.vm, "device": self.device, "at": self.at, "uuid": self.uuid}
        if self.host is not None:
            doc["host"] = self.host
        return doc


def disk_key(r: HangRecord) -> tuple[str, str, str]:
    """One disk: its exporter, VM and device (a VM name is unique on a host; UUIDs are not
    always set: a QEMU without ``-uuid`` reports all zeros)."""
    return (r.host or "", r.vm, r.device)


@dataclass(frozen=True, slots=True)
class Incident:
    """The hangs of one backend that overlap or follow each other within the gap."""

    backend: str
    start: float
    end: float
    hangs: tuple[HangRecord, ...]

    def disk_outcomes(self) -> dict[tuple[str, str, str], str]:
        """Each disk (`disk_key`) and the worst way one of its hangs ended."""
        worst: dict[tuple[str, str, str], str] = {}
        for r in self.hangs:
            k = disk_key(r)
            seen = worst.get(k)
            if seen is None or _SEVERITY[r.outcome] < _SEVERITY[seen]:
                worst[k] = r.outcome
        return worst

    def guests_saw_errors(self) -> list[GuestError]:
        """The disks that timed out, each at its first timeout, earliest first."""
        first: dict[tuple[str, str, str], HangRecord] = {}
        for r in self.hangs:
            if r.outcome == HangOutcome.TIMED_OUT:
                k = disk_key(r)
                seen = first.get(k)
                if seen is None or r.end < seen.end:
                    first[k] = r
        out = [GuestError(r.vm, r.uuid, r.device, r.end, r.host) for r in first.values()]
        out.sort(key=lambda g: (g.at, g.host or "", g.vm, g.device))
        return out

    def to_json(self) -> dict[str, Any]:
        outcomes = list(self.disk_outcomes().values())
        return {
            "backend": self.backend,
            "start": self.start,
            "end": self.end,
            "duration_seconds": self.end - self.start,
            "disks": len(outcomes),
            "vms": len({(r.host or "", r.vm) for r in self.hangs}),
            "hangs": len(self.hangs),
            "recovered": outcomes.count("recovered"),
            "timed_out": outcomes.count("timed_out"),
            "vm_gone": outcomes.count("vm_gone"),
            "guests_saw_errors": [g.to_json() for g in self.guests_saw_errors()],
        }


def group_incidents(records: Iterable[HangRecord], gap_s: float = INCIDENT_GAP_S) -> list[Incident]:
    """Group ``records`` per backend into incidents (module docstring), newest first (latest
    start first).  O(n log n); the result does not depend on the order of ``records``."""
    by_backend: dict[str, list[HangRecord]] = {}
    for r in records:
        by_backend.setdefault(r.backend, []).append(r)
    incidents: list[Incident] = []
    for backend, hangs in by_backend.items():
        hangs.sort(key=lambda r: (r.start, r.end, r.host or "", r.vm, r.device, r.outcome))
        current: list[HangRecord] = []
        end = -math.inf
        for r in hangs:
            if current and r.start > end + gap_s:
                incidents.append(Incident(backend, current[0].start, end, tuple(current)))
                current = []
            if not current:
                end = r.end
            current.append(r)
            end = max(end, r.end)
        if current:
            incidents.append(Incident(backend, current[0].start, end, tuple(current)))
    incidents.sort(key=lambda i: (i.start, i.end, i.backend), reverse=True)
    return incidents


def incidents_json(records: Sequence[HangRecord], gap_s: float = INCIDENT_GAP_S) -> list[dict[str, Any]]:
    """`group_incidents` as ``/api/v1/incidents`` lists them."""
    return [i.to_json() for i in group_incidents(records, gap_s)]
