"""Issue "Track IO hangs against retry_timeout": the acceptance scenarios, end to end.

Simulated openEuler QEMUs (the retry policy exists in no installable QEMU) over real unix
sockets, the exporter as a subprocess, everything read from /metrics.  Independent scenarios
run concurrently against one exporter to keep the suite fast; each asserts on its own VM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

from qmpsim import DiskSpec, SimVM
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics

HANG_FAST: dict[str, Any] = {**FAST, "poll_interval_seconds": 1.0}


def disk(id: str, interval_ms: int = 1000, timeout_ms: int = 10000, **kw: Any) -> DiskSpec:
    return DiskSpec(
        id=id,
        werror="retry",
        rerror="retry",
        retry_interval_ms=interval_ms,
        retry_timeout_ms=timeout_ms,
        in_flight=kw.pop("in_flight", 1),
        **kw,
    )


def v(m: Metrics, name: str, vm: str, device: str = "virtio-disk0", **labels: str) -> float | None:
    return m.value(name, vm=vm, device=device, **labels)


async def outage(vm: SimVM, device: str, seconds: float, in_flight: int = 1) -> float:
    """Storage of one disk down for ``seconds``; returns the wall time it went down."""
    t0 = time.time()
    vm.link_down(device, in_flight=in_flight, operations=("write",))
    await asyncio.sleep(seconds)  # the outage itself: its length is what is being measured
    vm.link_up(device)
    return t0


async def recovered_after_7s(exp: ExporterProcess, vm: SimVM) -> None:
    await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "r7") == 0, what="r7 ready")
    task = asyncio.create_task(outage(vm, "virtio-disk0", 7.0, in_flight=4))
    m = await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "r7") == 1, what="r7 hanging")
    t0_seen = v(m, "qemu_block_io_hang_start_timestamp_seconds", "r7")
    assert v(m, "qemu_block_io_hang_deadline_timestamp_seconds", "r7") == (t0_seen or 0) + 10
    t0 = await task
    assert t0_seen is not None and abs(t0_seen - t0) < 0.5
    m = await exp.wait_metrics(
        lambda m: v(m, "qemu_block_io_hangs_total", "r7", outcome="recovered") == 1,
        timeout=6,
        what="r7 recovered",
    )
    assert v(m, "qemu_block_io_hang", "r7") == 0
    assert v(m, "qemu_block_io_hangs_total", "r7", outcome="timed_out") == 0
    duration = v(m, "qemu_block_io_hang_seconds_total", "r7")
    assert duration is not None and abs(duration - 7.0) <= 1.5, duration
    assert v(m, "qemu_block_io_hang_duration_seconds", "r7") == 0
    assert m.find("qemu_block_io_hang_start_timestamp_seconds", vm="r7") == []
    assert v(m, "qemu_block_io_failing", "r7") == 0


async def timed_out_after_10s(exp: ExporterProcess, vm: SimVM) -> None:
    await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "t15") == 0, what="t15 ready")
    vm.link_down("virtio-disk0", in_flight=2, operations=("write",))
    m = await exp.wait_metrics(
        lambda m: v(m, "qemu_block_io_hangs_total", "t15", outcome="timed_out") == 1,
        timeout=14,
        what="t15 timed out",
    )
    duration = v(m, "qemu_block_io_hang_seconds_total", "t15")
    assert duration is not None and abs(duration - 10.0) <= 1.5, duration
    assert v(m, "qemu_block_io_hang", "t15") == 0
    assert v(m, "qemu_block_io_failing", "t15") == 1
    await asyncio.sleep(3)  # the link stays down: failing must hold, no new hang
    m = await exp.scrape()
    assert v(m, "qemu_block_io_failing", "t15") == 1
    assert v(m, "qemu_block_io_hang", "t15") == 0
    assert (v(m, "qemu_block_io_error_events_total", "t15", operation="write", action="report") or 0) > 10
    vm.link_up("virtio-disk0")
    m = await exp.wait_metrics(
        lambda m: v(m, "qemu_block_io_failing", "t15") == 0, timeout=6, what="t15 healthy"
    )
    assert v(m, "qemu_block_io_hangs_total", "t15", outcome="recovered") == 0


async def never_times_out(exp: ExporterProcess, vm: SimVM) -> None:
    await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "z30") == 0, what="z30 ready")
    vm.link_down("virtio-disk0", in_flight=1, operations=("write",))
    t_end = time.monotonic() + 30
    last = -1.0
    samples = 0
    while time.monotonic() < t_end:
        m = await exp.scrape()
        if v(m, "qemu_block_io_hang", "z30") == 1:
            d = v(m, "qemu_block_io_hang_duration_seconds", "z30") or 0.0
            assert d >= last, (d, last)
            last = d
            samples += 1
            assert m.find("qemu_block_io_hang_deadline_timestamp_seconds", vm="z30") == []
            assert v(m, "qemu_block_io_failing", "z30") == 0
        elif samples:
            raise AssertionError("z30 stopped hanging while its storage was down")
        await asyncio.sleep(0.5)  # sampling period of the observation, not synchronisation
    vm.link_up("virtio-disk0")
    assert samples > 40 and last >= 28, (samples, last)
    m = await exp.wait_metrics(
        lambda m: v(m, "qemu_block_io_hangs_total", "z30", outcome="recovered") == 1, timeout=6
    )
    assert v(m, "qemu_block_io_hangs_total", "z30", outcome="timed_out") == 0


async def two_disks_independent(exp: ExporterProcess, vm: SimVM) -> None:
    await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "two", "virtio-disk1") == 0, what="two ready")
    vm.link_down("virtio-disk0", in_flight=1, operations=("write",))
    await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "two") == 1)
    vm.link_down("virtio-disk1", in_flight=3, operations=("read",))
    m = await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "two", "virtio-disk1") == 1)
    s0 = v(m, "qemu_block_io_hang_start_timestamp_seconds", "two")
    s1 = v(m, "qemu_block_io_hang_start_timestamp_seconds", "two", "virtio-disk1")
    assert s0 is not None and s1 is not None and s1 > s0
    vm.link_up("virtio-disk0")
    m = await exp.wait_metrics(
        lambda m: v(m, "qemu_block_io_hangs_total", "two", outcome="recovered") == 1, timeout=6
    )
    assert v(m, "qemu_block_io_hang", "two", "virtio-disk1") == 1
    vm.link_up("virtio-disk1")
    await exp.wait_metrics(
        lambda m: v(m, "qemu_block_io_hangs_total", "two", "virtio-disk1", outcome="recovered") == 1,
        timeout=6,
    )


def vm_gone_count(m: Metrics) -> float:
    return m.value("qemu_block_io_hang_completed_duration_seconds_count", outcome="vm_gone") or 0.0


async def killed_mid_hang(exp: ExporterProcess, vm: SimVM) -> None:
    await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "dies") == 0, what="dies ready")
    before = vm_gone_count(await exp.scrape())
    vm.link_down("virtio-disk0", in_flight=1, operations=("write",))
    await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "dies") == 1)
    await vm.kill()
    m = await exp.wait_metrics(lambda m: vm_gone_count(m) == before + 1, timeout=5, what="vm_gone outcome")
    assert m.find("qemu_block_io_hang", vm="dies") == []


async def test_hang_scenarios(short_tmp: Path) -> None:
    vms = {
        "r7": SimVM(str(short_tmp / "r7.qmp"), name="r7", disks=[disk("virtio-disk0", in_flight=0)]),
        "t15": SimVM(str(short_tmp / "t15.qmp"), name="t15", disks=[disk("virtio-disk0", in_flight=0)]),
        "z30": SimVM(
            str(short_tmp / "z30.qmp"), name="z30", disks=[disk("virtio-disk0", timeout_ms=0, in_flight=0)]
        ),
        "two": SimVM(
            str(short_tmp / "two.qmp"),
            name="two",
            disks=[disk("virtio-disk0", in_flight=0), disk("virtio-disk1", in_flight=0, type="scsi-hd")],
        ),
        "dies": SimVM(str(short_tmp / "dies.qmp"), name="dies", disks=[disk("virtio-disk0", in_flight=0)]),
    }
    for vm in vms.values():
        await vm.start()
    try:
        async with ExporterProcess(
            short_tmp, {"qmp": {"globs": [str(short_tmp / "*.qmp")], **HANG_FAST}}
        ) as exp:
            await asyncio.gather(
                recovered_after_7s(exp, vms["r7"]),
                timed_out_after_10s(exp, vms["t15"]),
                never_times_out(exp, vms["z30"]),
                two_disks_independent(exp, vms["two"]),
                killed_mid_hang(exp, vms["dies"]),
            )
            m = await exp.scrape()
            assert (
                m.value("qemu_block_io_hang_completed_duration_seconds_count", outcome="recovered") or 0
            ) >= 4
    finally:
        for vm in vms.values():
            await vm.kill()


async def test_restart_mid_hang_keeps_its_start(short_tmp: Path) -> None:
    vm = SimVM(
        str(short_tmp / "vm.qmp"), name="vm", disks=[disk("virtio-disk0", timeout_ms=60000, in_flight=0)]
    )
    await vm.start()
    state = short_tmp / "hangs.json"
    cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **HANG_FAST}, "hang": {"state_file": str(state)}}
    try:
        exp = ExporterProcess(short_tmp, cfg)
        await exp.start()
        await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "vm") == 0)
        t0 = time.time()
        vm.link_down("virtio-disk0", in_flight=2, operations=("write",))
        m = await exp.wait_metrics(lambda m: v(m, "qemu_block_io_hang", "vm") == 1)
        start = v(m, "qemu_block_io_hang_start_timestamp_seconds", "vm")

        def persisted() -> bool:
            try:
                doc = json.loads(state.read_text())
            except (OSError, ValueError):
                return False
            return any(d.get("hang_start") for devs in doc["disks"].values() for d in devs.values())

        async def wait_persisted() -> bool:
            return persisted()

        from tests.support.waits import wait_for

        await wait_for(wait_persisted, 5, "the open hang in the state file")
        await asyncio.sleep(max(0.0, t0 + 5 - time.time()))  # 5 s into the hang, as the issue says
        exp.stop(signal.SIGKILL)

        exp2 = ExporterProcess(short_tmp, cfg)
        await exp2.start()
        try:
            m = await exp2.wait_metrics(
                lambda m: v(m, "qemu_block_io_hang", "vm") == 1, what="hang after restart"
            )
            start2 = v(m, "qemu_block_io_hang_start_timestamp_seconds", "vm")
            assert start is not None and start2 is not None and abs(start2 - start) <= 1.0
            assert (v(m, "qemu_block_io_hang_duration_seconds", "vm") or 0) >= 5
            await asyncio.sleep(max(0.0, t0 + 20 - time.time()))  # the rest of the 20 s outage
            vm.link_up("virtio-disk0")
            m = await exp2.wait_metrics(
                lambda m: v(m, "qemu_block_io_hangs_total", "vm", outcome="recovered") == 1, timeout=6
            )
            duration = v(m, "qemu_block_io_hang_seconds_total", "vm")
            assert duration is not None and abs(duration - 20) <= 1.5, duration
        finally:
            exp2.stop()
        # Restarted once more (SIGTERM: the state is written on the way out): the status page
        # still lists the hang that ended before, with its times.
        async with ExporterProcess(short_tmp, cfg) as exp3:
            recent = (await exp3.status())["recent_hangs"]
            assert [(r["vm"], r["device"], r["outcome"]) for r in recent] == [
                ("vm", "virtio-disk0", "recovered")
            ]
            assert abs(recent[0]["start"] - start) <= 1.0 and abs(recent[0]["duration_seconds"] - 20) <= 1.5
    finally:
        await vm.kill()


async def test_event_storm_loses_nothing(short_tmp: Path) -> None:
    """100 disks x 10 in-flight requests at a 100 ms interval: counters equal what QEMU sent."""
    vms = [
        SimVM(
            str(short_tmp / f"s{i}.qmp"),
            name=f"s{i}",
            disks=[disk(f"virtio-disk{j}", interval_ms=100, timeout_ms=0, in_flight=0) for j in range(10)],
        )
        for i in range(10)
    ]
    for vm in vms:
        await vm.start()
    try:
        async with ExporterProcess(
            short_tmp, {"qmp": {"globs": [str(short_tmp / "*.qmp")], **HANG_FAST}}
        ) as exp:
            await exp.wait_metrics(lambda m: len(m.find("qemu_block_io_hang")) == 100, what="100 disks")
            for vm in vms:
                for d in vm.disks:
                    vm.link_down(d, in_flight=10, operations=("write",))
            await exp.wait_metrics(lambda m: m.sum("qemu_block_io_hang") == 100, timeout=10)
            await asyncio.sleep(3)  # let the storm run
            for vm in vms:
                for d in vm.disks:
                    vm.link_up(d)
            sent = {vm.name: vm.event_count("BLOCK_IO_ERROR", socket=vm.socket_path) for vm in vms}
            assert sum(sent.values()) >= 100 * 10 * 10  # at least 1 s worth of the storm

            def settled(m: Metrics) -> bool:
                return all(
                    m.sum("qemu_block_io_error_events_total", vm=name) == n for name, n in sent.items()
                )

            m = await exp.wait_metrics(settled, timeout=20, what="every event counted")
            assert m.sum("qemu_exporter_io_error_events_unmatched_total") == 0
            m = await exp.wait_metrics(
                lambda m: m.sum("qemu_block_io_hangs_total", outcome="recovered") == 100,
                timeout=10,
                what="100 recovered hangs",
            )
    finally:
        for vm in vms:
            await vm.kill()
