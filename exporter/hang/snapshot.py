"""A disk hang tracker's saved state: the JSON a `DiskHangTracker` writes for the state file, so
that a hang open when the exporter stops is still open (same start, same counters) after it
starts again, and the reading back of such a file.

A state file is input: it may come from another version, be truncated or edited by hand.  So
reading it checks every field it uses and raises ValueError on the first bad one, before the
tracker applies any of it (`DiskHangTracker.restore`, which also decides what the time spent
down means).  Pure: no file, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from exporter.hang.numbers import finite, non_negative
from exporter.hang.outcome import HangOutcome

__all__ = ["SNAPSHOT_VERSION", "SavedFailing", "SavedHang", "SavedTracker", "parse"]

SNAPSHOT_VERSION: Final[int] = 1


@dataclass(frozen=True, slots=True)
class SavedHang:
    """The hang open when the state was saved."""

    start: float
    last_error: float
    #: Latest moment the hang was known to persist (never before ``last_error`` once read).
    known_until: float
    stop_pause: bool
    #: A RESUME with no error since (dropped on reading when it precedes ``last_error``).
    resume_ts: float | None
    events: int


@dataclass(frozen=True, slots=True)
class SavedFailing:
    """The failing period (errors reaching the guest) open when the state was saved; a field
    missing from the file reads as None and the tracker fills it in from the restore time."""

    since: float | None
    last_report: float | None


@dataclass(frozen=True, slots=True)
class SavedTracker:
    """Everything of a tracker that survives a restart (undrained completed hangs are not saved:
    the histogram they feed does not survive a restart either)."""

    retry_interval_s: float
    retry_timeout_s: float
    margin_s: float
    observed_spacing: float
    paused: bool
    hangs_total: Mapping[HangOutcome, int]
    hang_seconds_completed: float
    last_end: float | None
    #: Latest time the tracker was fed; None if never.
    clock: float | None
    hang: SavedHang | None
    failing: SavedFailing | None

    def to_json(self) -> dict[str, Any]:
        """The state file's form of this state (JSON-serialisable, keys in a fixed order)."""
        h, f = self.hang, self.failing
        return {
            "version": SNAPSHOT_VERSION,
            "retry_interval_s": self.retry_interval_s,
            "retry_timeout_s": self.retry_timeout_s,
            "margin_s": self.margin_s,
            "hang_start": None if h is None else h.start,
            "last_error": None if h is None else h.last_error,
            "known_until": None if h is None else h.known_until,
            "observed_spacing": self.observed_spacing,
            "paused": self.paused,
            "stop_pause": False if h is None else h.stop_pause,
            "resume_ts": None if h is None else h.resume_ts,
            "hang_events": 0 if h is None else h.events,
            "failing": f is not None,
            "failing_since": None if f is None else f.since,
            "last_report": None if f is None else f.last_report,
            "hangs_total": {o.value: n for o, n in self.hangs_total.items()},
            "hang_seconds_completed": self.hang_seconds_completed,
            "last_end": self.last_end,
            "clock": self.clock,
        }


def parse(
    data: Mapping[str, Any],
    *,
    retry_interval_s: float | None = None,
    retry_timeout_s: float | None = None,
    margin_s: float | None = None,
) -> SavedTracker:
    """Read what `SavedTracker.to_json` wrote.  Policy arguments override the saved policy (the
    saved one is then not read at all).  Raises ValueError on malformed data."""
    if not isinstance(data, Mapping) or data.get("version") != SNAPSHOT_VERSION:
        raise ValueError("unsupported hang snapshot")
    try:
        interval = _num(data, "retry_interval_s") if retry_interval_s is None else retry_interval_s
        timeout = _num(data, "retry_timeout_s") if retry_timeout_s is None else retry_timeout_s
        margin = _num(data, "margin_s") if margin_s is None else margin_s
        return SavedTracker(
            retry_interval_s=non_negative("retry_interval_s", interval),
            retry_timeout_s=non_negative("retry_timeout_s", timeout),
            margin_s=non_negative("margin_s", margin),
            hangs_total=_counts(data["hangs_total"]),
            hang_seconds_completed=non_negative(
                "hang_seconds_completed", _num(data, "hang_seconds_completed")
            ),
            last_end=_opt_num(data, "last_end"),
            clock=_opt_num(data, "clock"),
            observed_spacing=non_negative("observed_spacing", _num(data, "observed_spacing")),
            paused=bool(data.get("paused", False)),
            hang=_hang(data),
            failing=_failing(data),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed hang snapshot: {e}") from e


def _counts(counts: object) -> dict[HangOutcome, int]:
    if not isinstance(counts, Mapping):
        raise ValueError("hangs_total")
    out: dict[HangOutcome, int] = {}
    for o in HangOutcome:
        n = counts.get(o.value, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"hangs_total[{o.value}]")
        out[o] = n
    return out


def _hang(data: Mapping[str, Any]) -> SavedHang | None:
    start = _opt_num(data, "hang_start")
    if start is None:
        return None
    last_err = _opt_num(data, "last_error")
    last_err = start if last_err is None else max(start, last_err)
    known = _opt_num(data, "known_until")
    resume = _opt_num(data, "resume_ts")
    events = data.get("hang_events", 0)
    return SavedHang(
        start=start,
        last_error=last_err,
        known_until=last_err if known is None else max(known, last_err),
        stop_pause=bool(data.get("stop_pause", False)),
        resume_ts=resume if resume is not None and resume >= last_err else None,
        events=events if type(events) is int and events > 0 else 0,
    )


def _failing(data: Mapping[str, Any]) -> SavedFailing | None:
    if not data.get("failing"):
        return None
    since = _opt_num(data, "failing_since")
    return SavedFailing(since=since, last_report=_opt_num(data, "last_report"))


def _num(data: Mapping[str, Any], key: str) -> float:
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{key} must be a number")
    return finite(key, v)


def _opt_num(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else _num(data, key)
