"""The push path across an exporter restart (SIGTERM, state file kept), on a real Alertmanager.

A clean shutdown leaves the pushed alerts firing (they expire at their ``endsAt`` if the exporter
never comes back); the restarted exporter restores the open hang from the state file and pushes
the same alert again (same labels, same ``startsAt``).  So, at the webhook:

* a hang that outlasts the restart: one firing notification, no resolved one until the storage
  returns (no resolve-and-refire of a real hang);
* a hang that ended while the exporter was down: resolved soon after the restart, not when the
  alert's ``endsAt`` (4 x the resend interval, here 4 min) passes.

Simulated VM -> exporter (subprocess, twice) -> prometheus-alertmanager -> webhook in the test.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from qmpsim import DiskSpec, SimVM
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.prometheus import Alertmanager, WebhookReceiver, alertmanager_config
from tests.support.waits import wait_for

ALERT = "QemuIOHangApproachingTimeout"
#: Far beyond the test: an alert still active in Alertmanager was not left to expire.
RESEND_S = 60.0


def _exporter_config(sock: Path, state: Path, am_url: str) -> dict[str, Any]:
    return {
        "qmp": {**FAST, "poll_interval_seconds": 1.0, "sockets": [str(sock)]},
        "hang": {"state_file": str(state)},
        "alerting": {
            "alertmanager_urls": [am_url],
            "instance": "hv1:9738",  # what Prometheus calls it: the same before and after the restart
            "job": "qemu-iohang",
            # 10 % of the 20 s retry_timeout: pushed 2 s into the hang, so the test is short.
            "fractions": {"warning": 0.1},
            "resend_interval_seconds": RESEND_S,
        },
    }


async def _pushes_ok(exp: ExporterProcess) -> float:
    m = await exp.scrape()
    return m.sum("qemu_exporter_alert_pushes_total", result="success")


async def test_restart_neither_resolves_nor_refires_a_hang(short_tmp: Path) -> None:
    sock = short_tmp / "vm.qmp"
    vm = SimVM(
        str(sock),
        name="vm",
        disks=[
            DiskSpec(
                id="virtio-disk0",
                werror="retry",
                rerror="retry",
                retry_interval_ms=1000,
                retry_timeout_ms=20000,
            )
        ],
    )
    hook = WebhookReceiver()
    am = Alertmanager(short_tmp / "am", alertmanager_config(hook.url))
    async with hook, vm, am:
        cfg = _exporter_config(sock, short_tmp / "hangs.json", am.url)

        def notified(status: str) -> list[tuple[float, dict[str, Any]]]:
            return hook.alerts(ALERT, status)

        async def in_am() -> dict[str, Any] | None:
            alerts = await am.alerts(alertname=ALERT)
            assert len(alerts) <= 1, alerts
            return alerts[0] if alerts else None

        # --- 1. a hang that outlasts the restart -----------------------------------------
        (short_tmp / "e1").mkdir()
        exp1 = ExporterProcess(short_tmp / "e1", cfg)
        async with exp1:
            await exp1.wait_metrics(lambda m: m.value("qemu_block_io_hang", vm="vm") == 0)
            vm.link_down("virtio-disk0", in_flight=1, operations=("write",))
            await wait_for(
                lambda: _async(notified("firing")), timeout=8, what="the pushed alert at the webhook"
            )
            before = await in_am()
            assert before is not None and before["status"]["state"] == "active"
            assert exp1.stop() == 0  # SIGTERM: a clean shutdown
        assert "resolving pushed alert" not in exp1.log()
        assert "leaving pushed alerts firing" in exp1.log()
        # Still active in Alertmanager: nothing resolved it, and its endsAt is minutes away.
        after_stop = await in_am()
        assert after_stop is not None and after_stop["status"]["state"] == "active"
        assert after_stop["endsAt"] == before["endsAt"]

        (short_tmp / "e2").mkdir()
        exp2 = ExporterProcess(short_tmp / "e2", cfg)
        async with exp2:

            async def repushed() -> dict[str, Any] | None:
                a = await in_am()
                return a if a is not None and _ts(a["endsAt"]) > _ts(before["endsAt"]) else None

            # The restored hang is pushed again as soon as the VM's disks are read.
            again = await wait_for(repushed, timeout=10, what="the alert pushed again after the restart")
            assert await _pushes_ok(exp2) >= 1
            assert again["fingerprint"] == before["fingerprint"]
            assert again["startsAt"] == before["startsAt"]  # the crossing of the original hang
            assert again["status"]["state"] == "active"
            m = await exp2.scrape()
            assert m.value("qemu_block_io_hang", vm="vm") == 1

            t_up = time.time()
            vm.link_up("virtio-disk0")
            resolved = await wait_for(
                lambda: _async(notified("resolved")), timeout=10, what="resolved at the webhook"
            )
            assert resolved[0][0] >= t_up
            # One hang, one page: a single firing notification, resolved once, after recovery.
            assert len(notified("firing")) == 1, notified("firing")
            assert len(notified("resolved")) == 1
            m = await exp2.wait_metrics(
                lambda m: m.value("qemu_block_io_hangs_total", vm="vm", outcome="recovered") == 1,
                what="one recovered hang",
            )
            assert m.value("qemu_block_io_hangs_total", vm="vm", outcome="timed_out") == 0

            # --- 2. a hang that ends while the exporter is down --------------------------
            vm.link_down("virtio-disk0", in_flight=1, operations=("write",))
            await wait_for(
                lambda: _async(len(notified("firing")) == 2 or None),
                timeout=8,
                what="the second hang's alert at the webhook",
            )
            assert exp2.stop() == 0
        vm.link_up("virtio-disk0")  # the storage returns while nobody watches

        (short_tmp / "e3").mkdir()
        exp3 = ExporterProcess(short_tmp / "e3", cfg)
        async with exp3:
            t_start = time.time()
            # The restored hang is seen to be over (no error within one retry spacing plus
            # the margin) and its alert resolved, minutes before its endsAt.
            await wait_for(
                lambda: _async(len(notified("resolved")) == 2 or None),
                timeout=15,
                what="the second hang resolved after the restart",
            )
            print(
                f"\nhang ended while the exporter was down: resolved "
                f"{time.time() - t_start:.1f} s after the restart (endsAt was {4 * RESEND_S:.0f} s away)"
            )
            assert await in_am() is None
            m = await exp3.scrape()
            assert m.value("qemu_block_io_hangs_total", vm="vm", outcome="recovered") == 2
            assert len(notified("firing")) == 2


def _ts(rfc3339: str) -> dt.datetime:
    return dt.datetime.fromisoformat(rfc3339)


async def _async(value: Any) -> Any:
    return value
