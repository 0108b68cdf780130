"""Shared pieces of the fault suite: fast settings, the healthy neighbour, log and counter checks.

Every fault test runs the exporter subprocess against one faulty socket *and* a healthy
simulated VM (`good_vm`), and checks the same invariants (`Invariants`):

* the exporter never crashes and /metrics stays fast (each scrape timed);
* the healthy neighbour keeps updating (its write-operation counter, polled from
  ``query-blockstats``, grows after the fault);
* no counter series ever decreases while it exists (sampled by a background scraper);
* the exporter log holds one line per state change, not one per retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from pathlib import Path
from typing import Any

from qmpsim import DiskSpec, SimVM
from tests.support.config import FAULT_FAST, exporter_config
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics

#: A scrape slower than this is a stall (they take ~5 ms).
MAX_SCRAPE_SECONDS = 0.5


def good_vm(d: Path, name: str = "good") -> SimVM:
    """A healthy VM whose write counter keeps growing (one looping writer)."""
    disk = DiskSpec(
        id="virtio-disk0",
        werror="retry",
        rerror="retry",
        retry_interval_ms=1000,
        retry_timeout_ms=10000,
        in_flight=1,
        operations=("write",),
    )
    return SimVM(str(d / f"{name}.qmp"), name=name, disks=[disk])


def config(d: Path, *sockets: str, **qmp: Any) -> dict[str, Any]:
    """Explicit sockets (watched even while missing) plus the healthy neighbour's."""
    return exporter_config(d / "good.qmp", *sockets, intervals=FAULT_FAST, **qmp)


def parse_log(text: str) -> list[dict[str, str]]:
    """logfmt lines → dicts (values are JSON-quoted when they contain spaces)."""
    out: list[dict[str, str]] = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        fields = dict(t.split("=", 1) for t in tokens if "=" in t)
        if "msg" in fields:
            out.append(fields)
    return out


def log_lines(exp: ExporterProcess, vm: str, msg: str | None = None) -> list[dict[str, str]]:
    """The exporter's log lines about ``vm`` (by `vm` field), optionally one message only."""
    return [
        f
        for f in parse_log(exp.log())
        if f.get("vm") == vm and (msg is None or f["msg"] == msg) and f.get("caller") == "exporter.qmp"
    ]


def state_changes(exp: ExporterProcess, vm: str) -> list[str]:
    """The watcher's log lines for ``vm``, as ``msg[:reason]``."""
    return [f["msg"] + (f":{f['reason']}" if "reason" in f else "") for f in log_lines(exp, vm)]


class Invariants:
    """Background scraper: scrape latency, counters never decreasing, exporter alive."""

    def __init__(self, exp: ExporterProcess, period: float = 0.1) -> None:
        self.exp = exp
        self.period = period
        self.worst_scrape = 0.0
        self.scrapes = 0
        self.decreases: list[str] = []
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._task: asyncio.Task[None] | None = None

    def check(self, m: Metrics) -> None:
        for s in m.samples:
            kind = m.types.get(s.name.removesuffix("_total"))
            is_counter = kind == "counter" or s.name.endswith(("_total", "_count", "_sum", "_bucket"))
            if not is_counter or s.name.endswith("_created"):
                continue
            key = (s.name, tuple(sorted(s.labels.items())))
            before = self._last.get(key)
            if before is not None and s.value < before:
                self.decreases.append(f"{s.name}{s.labels}: {before} -> {s.value}")
            self._last[key] = s.value

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            m = await self.exp.scrape()
            self.worst_scrape = max(self.worst_scrape, time.monotonic() - t0)
            self.scrapes += 1
            self.check(m)
            await asyncio.sleep(self.period)  # sampling period, not synchronisation

    async def __aenter__(self) -> Invariants:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if exc[0] is None:
            self.assert_ok()
        else:  # the exporter's view, for the failure report
            print(self.exp.log()[-8000:])

    def assert_ok(self) -> None:
        assert self.exp.proc is not None and self.exp.proc.poll() is None, "the exporter died"
        assert self.scrapes >= 3, self.scrapes
        assert not self.decreases, self.decreases
        assert self.worst_scrape < MAX_SCRAPE_SECONDS, f"a scrape took {self.worst_scrape:.3f}s"
        assert "Traceback" not in self.exp.log(), self.exp.log()[-3000:]


async def good_keeps_updating(exp: ExporterProcess, vm: str = "good") -> None:
    """The healthy VM's polled counter grows from now on (its watcher is not stalled)."""
    m = await exp.scrape()
    assert m.value("qemu_qmp_up", vm=vm) == 1
    before = m.value("qemu_block_write_operations_total", vm=vm, device="virtio-disk0") or 0.0
    await exp.wait_metrics(
        lambda m: (m.value("qemu_block_write_operations_total", vm=vm, device="virtio-disk0") or 0) > before,
        timeout=5,
        what=f"{vm} to keep updating",
    )


async def wait_good_up(exp: ExporterProcess) -> Metrics:
    return await exp.wait_metrics(
        lambda m: (
            m.value("qemu_qmp_up", vm="good") == 1
            and m.value("qemu_block_write_operations_total", vm="good", device="virtio-disk0") is not None
        ),
        what="the healthy VM",
    )


async def wait_value(
    exp: ExporterProcess, name: str, at_least: float, timeout: float = 10.0, **labels: str
) -> Metrics:
    return await exp.wait_metrics(
        lambda m: m.sum(name, **labels) >= at_least,
        timeout=timeout,
        what=f"{name}{labels} >= {at_least}",
    )
