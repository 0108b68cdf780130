"""The exporter CLI with the alert push path wired in, for the pipeline test, until the wiring
lands in ``exporter/`` (``git apply tests/pipeline/wiring.patch``; then the test runs
``python -m exporter`` with ``alerting:`` instead, and this module and the patch can be deleted).

    python -m tests.pipeline.wired_exporter ALERTING.json -- <exporter flags>

It applies exactly the wiring documented for ``exporter/hang_tracking.py`` and
``exporter/app.py`` by subclassing: everything else is the real exporter (its CLI, config,
discovery, QMP sessions, hang tracking, HTTP server) and the real ``exporter.alert_push``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from exporter import app
from exporter.alert_push import AlertingConfig, AlertPusher, open_hangs
from exporter.hang import DiskHangTracker
from exporter.hang_tracking import HangTracking
from exporter.state import VMState

OnChange = Callable[[Mapping[str, Mapping[str, DiskHangTracker]]], None]


def _load(path: str) -> AlertingConfig:
    with open(path, encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    if "alertmanager_urls" in doc:
        doc["alertmanager_urls"] = tuple(doc["alertmanager_urls"])
    return AlertingConfig(**doc)


class WiredHangTracking(HangTracking):
    on_change: OnChange | None = None

    def on_event(self, vm: VMState, device: str | None, event: Mapping[str, Any]) -> None:
        t = self.trackers.get(vm.socket, {}).get(device) if device is not None else None
        was_hanging = t.hanging if t is not None else True
        super().on_event(vm, device, event)
        if t is not None and not was_hanging and t.hanging and self.on_change is not None:
            self.on_change(self.trackers)

    def tick(self, now: float) -> None:
        super().tick(now)
        if self.on_change is not None:
            self.on_change(self.trackers)


def main() -> int:
    alerting = _load(sys.argv[1])
    argv = sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:]

    class WiredExporter(app.Exporter):
        def __init__(self, config: Any, *args: Any, **kw: Any) -> None:
            super().__init__(config, *args, **kw)
            self.alert_pusher = AlertPusher(alerting, self.clock)
            self.registry.register(self.alert_pusher)
            pusher = self.alert_pusher
            assert isinstance(self.hangs, WiredHangTracking)
            self.hangs.on_change = lambda trackers: pusher.update(open_hangs(trackers, self.discovery.vms))

        async def start(self) -> None:
            await self.alert_pusher.start()
            await super().start()

        async def stop(self) -> None:
            await super().stop()
            await self.alert_pusher.stop()

    app.HangTracking = WiredHangTracking  # type: ignore[misc]
    app.Exporter = WiredExporter  # type: ignore[misc]
    from exporter.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
