"""A stopped exporter on a real QEMU: QEMU queues the events, /healthz tells afterwards.

The guest's disk fails (``werror=report``: one BLOCK_IO_ERROR per failed request) while the
exporter process is stopped (SIGSTOP) for a few seconds.  QEMU keeps every event for the
stopped client, in its own memory (docs/reliability.md has the cost).  After SIGCONT the
exporter reports the stop as event-loop lag (``/healthz`` 503, then 200 after the window) and
catches up: it counts exactly the events an independent QMP observer saw, none lost.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import aiohttp
import pytest

from tests.qemu.lab import (
    Lab,
    ends_recovered,
    io_error_counts,
    nbd_disk_args,
    plain_qmp,
    wait_guest,
    watching_disk,
)
from tests.support.config import REAL_QEMU, exporter_config
from tests.support.exporter import ExporterProcess
from tests.support.procs import rss_kib
from tests.support.waits import wait_for

pytestmark = pytest.mark.qemu

VM = "stopvm"
DEVICE = "virtio-disk0"
STOP_SECONDS = 3.0


async def _healthz(exp: ExporterProcess) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(exp.url + "/healthz") as r:
        return r.status, await r.text()


async def test_stopped_exporter_catches_up_and_reports_the_lag(lab: Lab) -> None:
    storage = lab.storage()
    vm = lab.vm(nbd_disk_args(storage, DEVICE, "werror=report,rerror=report"), name=VM)
    assert vm.mon2 is not None
    cfg = exporter_config(vm.qmp, intervals=REAL_QEMU)
    cfg["health"] = {"max_loop_lag_seconds": 1.0, "loop_lag_window_seconds": 3.0}
    d = lab.workdir / "exporter"
    d.mkdir()
    exp = ExporterProcess(d, cfg)
    lab.exporters.append(exp)
    await exp.start()
    assert exp.proc is not None
    await watching_disk(exp, VM, DEVICE)
    await wait_guest(vm, lambda s: "WRWR" in s, what="guest doing IO")

    async with plain_qmp(vm.mon2, "observer") as observer:
        observer.events.clear()
        storage.fail()
        await wait_guest(vm, lambda s: s.count("w") >= 5, what="guest IO failing")

        os.kill(exp.proc.pid, signal.SIGSTOP)
        try:
            rss_before = rss_kib(vm.proc.pid)
            failed_before = vm.debug_output().count("w")
            # The stimulus: the exporter stays stopped while the guest keeps failing.
            await wait_guest(
                vm, lambda s: s.count("w") >= failed_before + 50, timeout=60, what="events while stopped"
            )
            # How long it stays stopped is the test's input, not a wait for something to happen.
            await asyncio.sleep(STOP_SECONDS)
            rss_stopped = rss_kib(vm.proc.pid)
        finally:
            os.kill(exp.proc.pid, signal.SIGCONT)
        status, body = await _healthz(exp)
        assert status == 503 and body.startswith("event loop lagged "), (status, body)
        lag = (await exp.scrape()).value("qemu_exporter_event_loop_lag_seconds")
        assert lag is not None and lag >= STOP_SECONDS - 0.5, lag

        storage.recover()
        await wait_guest(vm, ends_recovered, what="guest IO recovered")
        await observer.execute("query-status")  # every event sent so far is in the listener
        sent: Counter[tuple[str, str]] = Counter()
        for event in observer.events.clear():
            if event["event"] == "BLOCK_IO_ERROR":
                sent[(event["data"]["operation"], event["data"]["action"])] += 1

    async def caught_up() -> bool:
        got = io_error_counts(await exp.scrape(), VM, DEVICE)
        assert got == sent, f"exporter {dict(got)} != QEMU {dict(sent)}"
        return True

    await wait_for(caught_up, timeout=15, what="every event QEMU queued counted")
    await wait_for(lambda: _ok(exp), timeout=10, what="/healthz 200 after the window")
    print(
        f"QEMU RSS {rss_before} -> {rss_stopped} KiB while the exporter was stopped; {sum(sent.values())} events"
    )


async def _ok(exp: ExporterProcess) -> bool:
    return await _healthz(exp) == (200, "ok\n")
