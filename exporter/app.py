"""Wires the parts together and runs them until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.alert_push import AlertPusher, open_hangs
from exporter.config import Config, validate_listen_address
from exporter.discovery import Discovery
from exporter.hang_tracking import HangTracking
from exporter.metrics import ExporterCollector
from exporter.web import make_app
from exporter.webconfig import WebConfig, auth_middleware

log = logging.getLogger("exporter")

#: How often the fleet's shape is checked for `Exporter._freeze_long_lived`.
GC_SETTLE_TICK_SECONDS = 1.0
#: Ticks of continuous change after which the full collection is done anyway (a flapping VM).
GC_SETTLE_MAX_TICKS = 30
#: Generation-1 collections between full ones while the fleet changes: never, in practice.
GC_DEFERRED_GEN2_THRESHOLD = 1_000_000
#: Objects promoted to the old generation in a tick above which the heap counts as changing
#: (a 4-disk VM's session is ~130 objects).
GC_SETTLE_PROMOTED = 5000


class Exporter:
    def __init__(
        self, config: Config, clock: Callable[[], float] = time.time, web_config: WebConfig | None = None
    ) -> None:
        self.config = config
        self.web_config = web_config or WebConfig()
        self.clock = clock
        self.hangs = HangTracking(config.hang.recovery_margin_seconds, config.hang.state_file)
        self.discovery = Discovery(config, self.hangs, clock)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            ExporterCollector(
                lambda: self.discovery.vms,
                self.discovery.static_label_names,
                hangs=self.hangs,
                clock=clock,
            )
        )
        self.alert_pusher: AlertPusher | None = None
        if config.alerting.enabled:
            pusher = self.alert_pusher = AlertPusher(config.alerting, clock)
            self.registry.register(pusher)
            self.hangs.on_change = lambda trackers: pusher.update(open_hangs(trackers, self.discovery.vms))
        self._runner: web.AppRunner | None = None
        self._hang_task: asyncio.Task[None] | None = None
        self._gc_task: asyncio.Task[None] | None = None

    def _fleet_shape(self) -> tuple[int, int]:
        vms = self.discovery.vms
        return len(vms), sum(1 for vm in vms if vm.up)

    async def _freeze_long_lived(
        self, tick: float = GC_SETTLE_TICK_SECONDS, max_ticks: int = GC_SETTLE_MAX_TICKS
    ) -> None:
        """Keep the sessions' long-lived objects out of the cyclic GC's full collections.

        At 1000 VMs the QMP sessions, watchers and caches are ~150,000 GC-tracked objects; a
        full (generation 2) collection walks all of them: 170-340 ms with the event loop
        stopped, every ~0.5 s while the fleet connects and every ~10-30 s after.  So while the
        fleet changes (start-up, sockets found or lost, sessions coming up or going down, or
        more than ``GC_SETTLE_PROMOTED`` objects promoted to the old generation in a tick)
        full collections are put off (young ones go on) and what survived is frozen every
        tick (`gc.freeze`: out of the collector's reach); once a tick passes without change
        (or after ``max_ticks`` of change), one full collection over everything, unfrozen
        first so that the cyclic garbage of dead sessions is freed, and a freeze again.  One
        pause per fleet change instead of recurring ones; full collections of what is created
        after the freeze (a small heap) run as usual.
        """
        gen0, gen1, gen2 = gc.get_threshold()
        shape, changing = self._fleet_shape(), 1
        gc.set_threshold(gen0, gen1, GC_DEFERRED_GEN2_THRESHOLD)
        try:
            while True:
                await asyncio.sleep(tick)
                now = self._fleet_shape()
                if changing and changing < max_ticks:
                    promoted = len(gc.get_objects(generation=2))  # since the last freeze
                    gc.freeze()
                    if now == shape and promoted < GC_SETTLE_PROMOTED:
                        changing = 0
                        gc.set_threshold(gen0, gen1, gen2)
                        gc.unfreeze()
                        gc.collect()
                        gc.freeze()
                    else:
                        changing += 1
                elif changing:  # changing for too long (a flapping VM): collect anyway
                    changing = 1
                    gc.unfreeze()
                    gc.collect()
                    gc.freeze()
                elif now != shape:
                    changing = 1
                    gc.set_threshold(gen0, gen1, GC_DEFERRED_GEN2_THRESHOLD)
                shape = now
        finally:
            gc.set_threshold(gen0, gen1, gen2)

    async def start(self) -> None:
        host, port = validate_listen_address(
            "--web.listen-address", "web.listen_address", self.config.listen_address
        )
        mw = auth_middleware(self.web_config)
        app = make_app(self.registry, self.config.telemetry_path, [mw] if mw else [])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host or None, port, reuse_address=True, ssl_context=self.web_config.ssl_context()
        )
        await site.start()
        if self.alert_pusher is not None:
            await self.alert_pusher.start()
        self.discovery.start()
        self._hang_task = asyncio.create_task(self.hangs.run(self.clock), name="hang-tick")
        self._gc_task = asyncio.create_task(self._freeze_long_lived(), name="gc-freeze")
        log.info(
            "listening",
            extra={
                "address": self.config.listen_address,
                "telemetry_path": self.config.telemetry_path,
                "version": __version__,
                "tls": self.web_config.tls_enabled,
                "basic_auth": self.web_config.basic_auth_enabled,
            },
        )

    async def stop(self) -> None:
        for task in (self._gc_task, self._hang_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.discovery.stop()
        self.hangs.save()  # open hangs survive the restart
        if self.alert_pusher is not None:
            await self.alert_pusher.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await self.start()
        try:
            await stopping.wait()
            log.info("shutting down")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await self.stop()
