"""The interface through which sources tell the rest of the exporter what happened to a VM."""

from __future__ import annotations

from typing import Any

from exporter.model.events import VMEvent
from exporter.model.state import VMState


class EventSink:
    """Hook for components that follow a VM's life (hang tracking, poll-time rendering).
    Default: nothing.

    Called synchronously, in order, by the VM's source; ``now`` is the host real-time clock.
    """

    def on_disks(self, vm: VMState, now: float) -> None:
        """The disk list was (re)read: ``vm.disks`` is current."""

    def on_event(self, vm: VMState, event: VMEvent) -> None:
        """A QEMU event, already applied to ``vm`` (`VMState.apply`)."""

    def on_blockstats(self, vm: VMState, now: float) -> None:
        """A blockstats sample was stored in ``vm.blockstats``."""

    def on_session_start(self, vm: VMState, now: float) -> None:
        """A session is established (after the first disk list and blockstats)."""

    def on_session_end(self, vm: VMState, now: float, vm_gone: bool) -> None:
        """The session ended; ``vm_gone`` when QEMU said it is shutting down."""

    def on_connect_failed(self, vm: VMState, now: float, reason: str) -> None:
        """A connection attempt failed with a bounded ``reason``; ``reason`` "refused" or
        "not_found" means nothing runs there any more."""

    def on_removed(self, vm: VMState, now: float) -> None:
        """The VM is no longer watched (socket vanished, domain gone)."""


class SinkGroup(EventSink):
    """Several sinks, each told everything, in order.  Sinks that leave a method as
    `EventSink` has it are not called for it: ``on_event`` runs for every QEMU event."""

    def __init__(self, *sinks: EventSink) -> None:
        def overriding(name: str) -> list[Any]:
            return [getattr(s, name) for s in sinks if getattr(type(s), name) is not getattr(EventSink, name)]

        self._on_disks = overriding("on_disks")
        self._on_event = overriding("on_event")
        self._on_blockstats = overriding("on_blockstats")
        self._on_session_start = overriding("on_session_start")
        self._on_session_end = overriding("on_session_end")
        self._on_connect_failed = overriding("on_connect_failed")
        self._on_removed = overriding("on_removed")

    def on_disks(self, vm: VMState, now: float) -> None:
        for f in self._on_disks:
            f(vm, now)

    def on_event(self, vm: VMState, event: VMEvent) -> None:
        for f in self._on_event:
            f(vm, event)

    def on_blockstats(self, vm: VMState, now: float) -> None:
        for f in self._on_blockstats:
            f(vm, now)

    def on_session_start(self, vm: VMState, now: float) -> None:
        for f in self._on_session_start:
            f(vm, now)

    def on_session_end(self, vm: VMState, now: float, vm_gone: bool) -> None:
        for f in self._on_session_end:
            f(vm, now, vm_gone)

    def on_connect_failed(self, vm: VMState, now: float, reason: str) -> None:
        for f in self._on_connect_failed:
            f(vm, now, reason)

    def on_removed(self, vm: VMState, now: float) -> None:
        for f in self._on_removed:
            f(vm, now)
