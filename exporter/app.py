"""Wires the parts together and runs them until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.config import Config, validate_listen_address
from exporter.discovery import Discovery
from exporter.metrics import ExporterCollector, HangView
from exporter.qmp_watch import EventSink
from exporter.web import make_app

log = logging.getLogger("exporter")


class Exporter:
    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.sink = EventSink()
        self.hang_view = HangView()
        self.discovery = Discovery(config, self.sink, clock)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            ExporterCollector(
                lambda: self.discovery.vms,
                self.discovery.static_label_names,
                hangs=self.hang_view,
                clock=clock,
            )
        )
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, port = validate_listen_address(
            "--web.listen-address", "web.listen_address", self.config.listen_address
        )
        app = make_app(self.registry, self.config.telemetry_path)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or None, port, reuse_address=True)
        await site.start()
        self.discovery.start()
        log.info(
            "listening",
            extra={
                "address": self.config.listen_address,
                "telemetry_path": self.config.telemetry_path,
                "version": __version__,
            },
        )

    async def stop(self) -> None:
        await self.discovery.stop()
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
