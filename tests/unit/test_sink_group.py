"""SinkGroup tells every sink everything it listens to, in order."""

from __future__ import annotations

from exporter.model.events import BlockIOError, RunStateChange, VMEvent
from exporter.model.sink import EventSink, SinkGroup
from exporter.model.state import VMState


class Recorder(EventSink):
    def __init__(self, name: str, calls: list[tuple[str, str]]) -> None:
        self.name, self.calls = name, calls

    def on_disks(self, vm: VMState, now: float) -> None:
        self.calls.append((self.name, "disks"))

    def on_event(self, vm: VMState, event: VMEvent) -> None:
        device = event.device if isinstance(event, BlockIOError) else None
        self.calls.append((self.name, f"event {device} {event.name}"))

    def on_blockstats(self, vm: VMState, now: float) -> None:
        self.calls.append((self.name, "blockstats"))

    def on_session_start(self, vm: VMState, now: float) -> None:
        self.calls.append((self.name, "start"))

    def on_session_end(self, vm: VMState, now: float, vm_gone: bool) -> None:
        self.calls.append((self.name, f"end {vm_gone}"))

    def on_connect_failed(self, vm: VMState, now: float, reason: str) -> None:
        self.calls.append((self.name, f"failed {reason}"))

    def on_removed(self, vm: VMState, now: float) -> None:
        self.calls.append((self.name, "removed"))


class StatsOnly(EventSink):
    def __init__(self, calls: list[tuple[str, str]]) -> None:
        self.calls = calls

    def on_blockstats(self, vm: VMState, now: float) -> None:
        self.calls.append(("stats-only", "blockstats"))


def test_every_sink_hears_what_it_listens_to_in_order() -> None:
    calls: list[tuple[str, str]] = []
    group = SinkGroup(Recorder("a", calls), StatsOnly(calls), Recorder("b", calls))
    vm = VMState.qmp("/run/x.qmp")
    group.on_disks(vm, 1.0)
    group.on_event(vm, BlockIOError(1.5, "virtio-disk0", "write", "retry"))
    group.on_blockstats(vm, 2.0)
    group.on_session_start(vm, 3.0)
    group.on_session_end(vm, 4.0, True)
    group.on_connect_failed(vm, 5.0, "refused")
    group.on_removed(vm, 6.0)
    group.on_event(vm, RunStateChange(6.5, "STOP"))
    expected = []
    for what in ("disks", "event virtio-disk0 BLOCK_IO_ERROR", "blockstats", "start", "end True",
                 "failed refused", "removed", "event None STOP"):  # fmt: skip
        expected.append(("a", what))
        if what == "blockstats":
            expected.append(("stats-only", "blockstats"))
        expected.append(("b", what))
    assert calls == expected
