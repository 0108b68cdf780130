"""What a hang leaves behind once it is over: how it ended (`HangOutcome`, the ``outcome`` label
of the completed-hang counter) and the finished hang itself (`CompletedHang`, for the duration
histogram and the hang journal).

Kept apart from the state machine (`exporter.hang.machine`) because its readers - metrics, the
journal, the incidents - need the record, not the machine that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["CompletedHang", "HangOutcome"]


class HangOutcome(StrEnum):
    """How a hang ended (the ``outcome`` label of the completed-hang counter)."""

    #: Attempts stopped failing (inferred: QEMU emits nothing on recovery).
    RECOVERED = "recovered"
    #: A ``report`` event: ``retry_timeout`` passed and the guest has seen the error.
    TIMED_OUT = "timed_out"
    #: QEMU exited, shut down, was reset, or the QMP connection was lost for good.
    VM_GONE = "vm_gone"


@dataclass(frozen=True, slots=True)
class CompletedHang:
    """A finished hang, for the completed-duration histogram."""

    start: float
    end: float
    outcome: HangOutcome
    #: ``BLOCK_IO_ERROR`` events of the hang: its failed attempts and the report that timed it
    #: out (the hang journal's ``io_error_events``).
    io_error_events: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start
