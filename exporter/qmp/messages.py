"""What QEMU sends unasked, as the QMP source keeps it: event messages decoded into the
model's typed events, and the compact forms held while a session is being established.

Until a session knows its disks, the watcher holds events and blockstats replies in QEMU's
order and applies them once it does; hang inference depends on that order
(`exporter.hang.machine`, "Order of inputs").  An exporter started into a storm holds many
events per VM, so a held BLOCK_IO_ERROR keeps only what decoding reads of it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exporter.model.events import VMEvent, decode, event_time
from exporter.model.state import VMState

#: BLOCK_IO_ERRORs held per VM while its disk list is re-read; beyond this they count as unmatched.
UNMATCHED_BUFFER = 1024


@dataclass(slots=True)
class HeldIOError:
    """A BLOCK_IO_ERROR held while its session is being established (its disks are not known
    yet): only what `decode_message` reads of it, names interned.  An exporter started into a
    storm holds ~50 events per VM: as decoded messages (three dicts each, ~1.2 KB) that was
    ~30 MB of its 165-175 MB high-water at 1000 VMs x 4 disks (measured: docs/performance-history.md)."""

    seconds: object
    microseconds: object
    node_name: object
    device: object
    qom_path: object
    operation: object
    action: object

    @staticmethod
    def hold(event: dict[str, Any]) -> HeldIOError | dict[str, Any]:
        """``event`` as held: a `HeldIOError` when it is a well-formed BLOCK_IO_ERROR, else
        itself (rare: other events, malformed ones)."""
        ts, data = event.get("timestamp"), event.get("data")
        if event.get("event") != "BLOCK_IO_ERROR" or type(ts) is not dict or type(data) is not dict:
            return event
        get = data.get
        return HeldIOError(
            ts.get("seconds"),
            ts.get("microseconds"),
            _intern(get("node-name")),
            _intern(get("device")),
            _intern(get("qom-path")),
            get("operation"),
            get("action"),
        )

    def typed(self, vm: VMState) -> VMEvent:
        """What `decode_message` makes of the message it was."""
        data = {
            "node-name": self.node_name,
            "device": self.device,
            "qom-path": self.qom_path,
            "operation": self.operation,
            "action": self.action,
        }
        return decode("BLOCK_IO_ERROR", data, event_time(self.seconds, self.microseconds), vm.match_disk)


def _intern(value: object) -> object:
    return sys.intern(value) if type(value) is str else value


@dataclass(frozen=True, slots=True)
class StatsReply:
    """A query-blockstats reply and when its command was sent (QEMU stamps no reply)."""

    reply: object
    time: float


#: What a session holds until it is established, in QEMU's order.
Held = dict[str, Any] | HeldIOError | StatsReply


def decode_message(event: Mapping[str, Any] | HeldIOError, vm: VMState) -> VMEvent:
    """A QMP event message (or one held while its session was established) as the model's
    typed event."""
    if isinstance(event, HeldIOError):
        return event.typed(vm)
    ts = event.get("timestamp")
    time = event_time(ts.get("seconds"), ts.get("microseconds")) if isinstance(ts, dict) else None
    return decode(event.get("event"), event.get("data"), time, vm.match_disk)
