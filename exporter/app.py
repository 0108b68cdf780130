"""Wires the parts together and runs them until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.alerting.push import AlertPusher, open_hangs
from exporter.config import Config, validate_listen_address
from exporter.exposition.cache import ExporterCollector
from exporter.exposition.formats import DurationCollector, Registry
from exporter.exposition.host import ConnectionCollector, JournalCollector
from exporter.hang.journal import HangJournal
from exporter.hang.tracking import HangTracking
from exporter.libvirt.source import LibvirtSource
from exporter.model.sink import SinkGroup
from exporter.model.state import VMState, one_per_vm
from exporter.qmp.discovery import Discovery, static_label_names
from exporter.runtime.blind import BlindSpots
from exporter.runtime.fairness import ScrapeFirst
from exporter.runtime.gc_tuning import Departures, freeze_long_lived
from exporter.runtime.liveness import Liveness, LivenessCollector, qmp_readers, watchdog
from exporter.runtime.sd_notify import Notifier
from exporter.storage import BackendResolver
from exporter.web.server import make_app
from exporter.web.status import build_status
from exporter.web.webconfig import WebConfig, auth_middleware

log = logging.getLogger("exporter")


class Exporter:
    def __init__(
        self, config: Config, clock: Callable[[], float] = time.time, web_config: WebConfig | None = None
    ) -> None:
        self.config = config
        self.web_config = web_config or WebConfig()
        self.clock = clock
        self.hangs = HangTracking(config.hang.recovery_margin_seconds, config.hang.state_file)
        #: Every completed hang in a file (`exporter.hang.journal`), when configured.
        self.journal: HangJournal | None = None
        if config.hang.journal_file:
            self.journal = HangJournal(config.hang.journal_file, config.hang.journal_max_bytes, clock)
            self.hangs.on_completed = self.journal.completed
        self.scrape_first = ScrapeFirst()
        enabled = config.collectors.enabled
        collector = ExporterCollector(
            self.vms,
            static_label_names(config),
            hangs=self.hangs,
            clock=clock,
            collectors=enabled,
        )
        self._departures = Departures()
        #: When the exporter could not see events (exporter.runtime.blind): counted, shown, and
        #: told to hang tracking so that a stall is never taken for silence.
        self.blind = BlindSpots(config.health.max_loop_lag_seconds)
        # The journal after the hang tracking: a VM's hangs are drained before it forgets the VM.
        sink = SinkGroup(self.hangs, collector, self._departures, self.blind, *filter(None, [self.journal]))
        backends = BackendResolver(config)
        self.discovery = Discovery(config, sink, clock, self.scrape_first, backends)
        self.libvirt = [
            LibvirtSource(uri, config, sink, clock, backends, on_blind=self.blind.connection)
            for uri in config.libvirt.uris
        ]
        self.registry = Registry()
        self.registry.register(collector)
        self.registry.register(self.blind)
        if self.libvirt and "libvirt" in enabled:
            self.registry.register(ConnectionCollector(lambda: [s.state for s in self.libvirt]), "libvirt")
        self.alert_pusher: AlertPusher | None = None
        if config.alerting.enabled:
            pusher = self.alert_pusher = AlertPusher(config.alerting, clock)
            self.registry.register(pusher)
            self.hangs.on_change = lambda trackers: pusher.update(open_hangs(trackers, self.vms()))
        if self.journal is not None:
            self.registry.register(JournalCollector(self.journal))
        self.liveness = Liveness(
            config.health, lambda: qmp_readers(self.discovery.watchers.values()), wall=clock
        )
        self.liveness.on_gap = self.blind.loop_gap
        self.hangs.loop_blind = self.liveness.loop_blind
        self.registry.register(LivenessCollector(self.liveness))
        # The exporter's own process (CPU, memory, fds, start time) and garbage collector, as
        # every prometheus_client exporter shows them: what the exporter costs its host in a
        # storm, and whether it restarted (docs/metrics.md).
        if "process" in enabled:
            self.registry.register(ProcessCollector(registry=None), "process")
            # GCCollector insists on registering somewhere: a registry of its own, then ours.
            self.registry.register(GCCollector(registry=CollectorRegistry()), "process")
        self.registry.register(DurationCollector(self.registry))  # last: it shows the others' time
        log.info("collectors", extra={"enabled": ",".join(sorted(enabled))})
        self.notifier = Notifier()
        self._liveness_tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._hang_task: asyncio.Task[None] | None = None
        self._gc_task: asyncio.Task[None] | None = None

    def vms(self) -> list[VMState]:
        """Every watched VM, once (`one_per_vm`)."""
        if not self.libvirt:
            return self.discovery.vms
        return one_per_vm(self.discovery.vms, [vm for s in self.libvirt for vm in s.vms])

    def status(self, details: bool = True) -> dict[str, Any]:
        """What the status page and ``/api/v1/status`` show (`exporter.web.status`)."""
        conns = [s.state for s in self.libvirt]
        incidents = self.journal.incidents_last_day() if self.journal is not None else None
        return build_status(
            self.vms(),
            self.hangs,
            self.config.policy,
            self.clock(),
            conns,
            details=details,
            incidents=incidents,
            blind=self.blind,
        )

    def _fleet_shape(self) -> tuple[int, int]:
        vms = self.vms()
        return len(vms), sum(1 for vm in vms if vm.up)

    async def start(self) -> None:
        host, port = validate_listen_address(
            "--web.listen-address", "web.listen_address", self.config.listen_address
        )
        mw = auth_middleware(self.web_config)
        app = make_app(
            self.registry,
            self.config.telemetry_path,
            [mw] if mw else [],
            self.scrape_first,
            health=self.liveness.problem,
            status=self.status,
            journal=self.journal,
            clock=self.clock,
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host or None, port, reuse_address=True, ssl_context=self.web_config.ssl_context()
        )
        await site.start()
        if self.alert_pusher is not None:
            await self.alert_pusher.start()
        self.discovery.start()
        for source in self.libvirt:
            source.start()
        self._hang_task = asyncio.create_task(self.hangs.run(self.clock), name="hang-tick")
        self._gc_task = asyncio.create_task(
            freeze_long_lived(self._fleet_shape, lambda: self._departures.count), name="gc-freeze"
        )
        self._liveness_tasks = [
            asyncio.create_task(self.liveness.run(), name="liveness"),
            asyncio.create_task(watchdog(self.notifier, self.liveness), name="systemd-watchdog"),
        ]
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
        self.notifier.notify("READY=1", "STATUS=listening")  # systemd Type=notify: started

    async def stop(self) -> None:
        self.notifier.notify("STOPPING=1")
        for task in (*self._liveness_tasks, self._gc_task, self._hang_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.discovery.stop()
        await asyncio.gather(*(source.stop() for source in self.libvirt))
        # Open hangs survive the restart (the state file); hangs completed since the last tick
        # reach the recent hangs and the journal.  The alert push is not told: with every
        # session ended it would see no open hang and resolve alerts the restart pushes again.
        self.hangs.on_change = None
        self.hangs.tick(self.clock())
        if self.journal is not None:
            await self.journal.close()
        if self.alert_pusher is not None:
            await self.alert_pusher.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self.notifier.close()

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
