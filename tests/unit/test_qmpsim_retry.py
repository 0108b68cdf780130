"""The retry state machine of domain.md section 3, stop/cont, drive-vs-device, hot unplug, CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from qmpsim import DiskSpec, SimVM
from qmpsim.control import start_control
from qmpsim.fleet import Fleet, load_fleet
from tests.support.waits import wait_for

ROOT = Path(__file__).resolve().parents[2]


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(path)
        c = cls(reader, writer)
        await c._line()
        await c.cmd("qmp_capabilities")
        return c

    async def _line(self, timeout: float = 5.0) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout))
        return obj

    async def cmd(self, execute: str, **kw: Any) -> Any:
        self.writer.write(json.dumps({"execute": execute, "arguments": kw}).encode() + b"\n")
        while True:
            obj = await self._line()
            if "event" in obj:
                self.events.append(obj)
            else:
                return obj.get("return", obj)

    async def event(self, name: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            obj = await self._line(timeout)
            if "event" in obj:
                self.events.append(obj)
                if name is None or obj["event"] == name:
                    return obj

    async def close(self) -> None:
        self.writer.close()


def ts(ev: dict[str, Any]) -> float:
    return float(ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6)


def retry_disk(**kw: Any) -> DiskSpec:
    args: dict[str, Any] = {"id": "virtio-disk0", "werror": "retry", "rerror": "retry"}
    args.update(kw)
    return DiskSpec(**args)


async def test_retry_then_timeout_1000_3000(short_tmp: Path) -> None:
    spec = retry_disk(retry_interval_ms=1000, retry_timeout_ms=3000)
    async with SimVM(str(short_tmp / "q.sock"), disks=[spec]) as vm:
        c = await Client.connect(vm.socket_path)
        vm.link_down("virtio-disk0", in_flight=1, operations=("write",))
        evs = [await c.event("BLOCK_IO_ERROR") for _ in range(6)]
        actions = [e["data"]["action"] for e in evs]
        assert actions == ["retry", "retry", "retry", "report", "report", "report"]
        t0 = ts(evs[0])
        offsets = [ts(e) - t0 for e in evs]
        for got, want in zip(offsets[:4], (0.0, 1.0, 2.0, 3.0), strict=True):
            assert abs(got - want) < 0.15, offsets
        # after the timeout the clock is not reset: reports follow at the guest's pace (~20/s)
        assert 0.02 < offsets[5] - offsets[4] < 0.15
        assert (await c.cmd("query-status"))["status"] == "running"
        stats = (await c.cmd("query-blockstats"))[0]["stats"]
        assert stats["failed_wr_operations"] >= 3  # virtio-blk: only final reports count
        vm.link_up("virtio-disk0")
        await c.close()


async def test_silent_recovery_and_clock_reset(short_tmp: Path) -> None:
    spec = retry_disk(retry_interval_ms=100, retry_timeout_ms=300)
    async with SimVM(str(short_tmp / "q.sock"), disks=[spec]) as vm:
        c = await Client.connect(vm.socket_path)
        before = (await c.cmd("query-blockstats"))[0]["stats"]["wr_operations"]
        vm.link_down("virtio-disk0", in_flight=2)
        first = await c.event("BLOCK_IO_ERROR")
        second = await c.event("BLOCK_IO_ERROR")
        assert ts(second) - ts(first) < 0.01  # two requests in flight fail together
        assert vm.event_count(device="virtio-disk0", action="retry") == 2
        vm.link_up("virtio-disk0")
        # the held requests succeed at the next retry timer; nothing is emitted

        async def written() -> dict[str, Any] | None:
            stats: dict[str, Any] = (await c.cmd("query-blockstats"))[0]["stats"]
            return stats if stats["wr_operations"] > before + 2 else None

        stats = await wait_for(written, 2, "the held writes to succeed", step=0.02)
        assert stats["failed_wr_operations"] == 0
        count = vm.event_count("BLOCK_IO_ERROR")
        assert count == 2
        assert "io-status" not in (await c.cmd("query-block"))[0]
        # clock reset: the next outage starts with retries again
        vm.link_down("virtio-disk0", in_flight=1)
        ev = await c.event("BLOCK_IO_ERROR")
        assert ev["data"]["action"] == "retry"
        vm.link_up("virtio-disk0")
        assert vm.event_count(None, socket=vm.socket_path) == vm.event_count(None)
        await c.close()


async def test_stop_and_cont(short_tmp: Path) -> None:
    spec = DiskSpec(id="virtio-disk0", werror="stop", rerror="stop")
    async with SimVM(str(short_tmp / "q.sock"), disks=[spec]) as vm:
        c = await Client.connect(vm.socket_path)
        vm.link_down("virtio-disk0")
        ev = await c.event("BLOCK_IO_ERROR")
        assert ev["data"]["action"] == "stop" and ev["data"]["nospace"] is False
        await c.event("STOP")
        assert await c.cmd("query-status") == {"status": "io-error", "singlestep": False, "running": False}
        assert (await c.cmd("query-block"))[0]["io-status"] == "failed"
        await c.cmd("cont")  # still down: RESUME, then stop again
        assert c.events[-1]["event"] == "RESUME"
        assert (await c.event("BLOCK_IO_ERROR"))["data"]["action"] == "stop"
        await c.event("STOP")
        vm.link_up("virtio-disk0")
        await c.cmd("cont")
        assert (await c.cmd("query-status"))["status"] == "running"
        assert (await c.cmd("query-block"))[0]["io-status"] == "ok"  # -drive: reset by cont
        assert vm.event_count(action="stop") == 2 and vm.event_count("STOP") == 2
        await c.cmd("stop")
        assert c.events[-1]["event"] == "STOP"
        assert (await c.cmd("query-status"))["status"] == "paused"
        await c.cmd("system_reset")
        assert c.events[-1]["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        await c.close()


async def test_policy_on_drive(short_tmp: Path) -> None:
    spec = retry_disk(policy_on="drive", retry_interval_ms=100, retry_timeout_ms=300)
    async with SimVM(str(short_tmp / "q.sock"), disks=[spec]) as vm:
        c = await Client.connect(vm.socket_path)
        path = "/machine/peripheral/virtio-disk0"
        assert await c.cmd("qom-get", path=path, property="werror") == "auto"
        assert await c.cmd("qom-get", path=path, property="rerror") == "auto"
        assert await c.cmd("qom-get", path=path, property="retry_interval") == 1000
        assert await c.cmd("qom-get", path=path, property="retry_timeout") == 0
        vm.link_down("virtio-disk0")
        a = await c.event("BLOCK_IO_ERROR")
        b = await c.event("BLOCK_IO_ERROR")
        assert a["data"]["action"] == b["data"]["action"] == "retry"
        assert 0.9 < ts(b) - ts(a) < 1.2  # the device default acts, not the -drive 100 ms
        vm.link_up("virtio-disk0")
        await c.close()


async def test_report_ignore_and_scsi_accounting(short_tmp: Path) -> None:
    specs = [
        DiskSpec(id="scsi0-0-0-0", type="scsi-hd", werror="retry", rerror="retry",
                 retry_interval_ms=100, naming="blockdev", node_name="n1"),
        DiskSpec(id="virtio-disk1", werror="ignore", rerror="report"),
    ]  # fmt: skip
    async with SimVM(str(short_tmp / "q.sock"), disks=specs) as vm:
        c = await Client.connect(vm.socket_path)
        vm.link_down("scsi0-0-0-0")
        vm.link_down("virtio-disk1", operations=("read", "write"))
        while (
            vm.event_count(device="scsi0-0-0-0") < 3
            or vm.event_count(device="virtio-disk1", action="ignore") < 2
        ):
            await c.event("BLOCK_IO_ERROR")
        assert vm.event_count(device="virtio-disk1", operation="read", action="report") >= 2
        ev = next(e for e in c.events if e["data"]["node-name"] == "n1")
        assert ev["data"]["device"] == ""
        vm.link_up("scsi0-0-0-0")
        vm.link_up("virtio-disk1")
        stats = {s["qdev"]: s["stats"] for s in await c.cmd("query-blockstats")}
        assert stats["scsi0-0-0-0"]["failed_wr_operations"] >= 3  # every attempt counts
        assert stats["/machine/peripheral/virtio-disk1/virtio-backend"]["failed_wr_operations"] == 0
        await c.close()


async def test_hot_unplug(short_tmp: Path) -> None:
    specs = [DiskSpec(id="virtio-disk0"), DiskSpec(id="scsi0-0-0-0", type="scsi-hd")]
    async with SimVM(str(short_tmp / "q.sock"), disks=specs) as vm:
        c = await Client.connect(vm.socket_path)
        assert await c.cmd("device_del", id="virtio-disk0") == {}
        first = await c.event("DEVICE_DELETED")
        second = await c.event("DEVICE_DELETED")
        assert first["data"] == {"path": "/machine/peripheral/virtio-disk0/virtio-backend"}
        assert second["data"] == {"device": "virtio-disk0", "path": "/machine/peripheral/virtio-disk0"}
        err = await c.cmd("device_del", id="nope")
        assert err["error"] == {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}
        vm.hot_unplug("scsi0-0-0-0")
        ev = await c.event("DEVICE_DELETED")
        assert ev["data"] == {"device": "scsi0-0-0-0", "path": "/machine/peripheral/scsi0-0-0-0"}
        assert await c.cmd("query-block") == []
        vm.hot_plug(DiskSpec(id="virtio-disk2"))
        assert [b["qdev"] for b in await c.cmd("query-block")] == [
            "/machine/peripheral/virtio-disk2/virtio-backend"
        ]
        await c.close()


def test_bad_fleet_file_exits_2(short_tmp: Path) -> None:
    bad = short_tmp / "bad.yaml"
    bad.write_text("socket_dir: /tmp/x\nvms:\n  - name: a\n    disks:\n      - {id: d, colour: red}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "qmpsim", "run", "--fleet", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "colour" in lines[0]
    assert "Traceback" not in proc.stderr


async def test_demo_fleet_and_control_api(short_tmp: Path) -> None:
    config = load_fleet(str(ROOT / "qmpsim" / "fleets" / "demo.yaml"))
    assert {vm.name for vm in config.vms} >= {"compliant", "stop-policy", "upstream"}
    config.socket_dir = str(short_tmp)
    for vc in config.vms:
        vc.socket = str(short_tmp / f"{vc.name}.qmp")
    fleet = Fleet(config)
    await fleet.start()
    runner, port = await start_control(fleet, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/vms") as r:
                assert len(await r.json()) == len(config.vms)
            c = await Client.connect(str(short_tmp / "compliant.qmp"))
            url = f"{base}/vms/compliant/disks/virtio-disk0/link"
            async with http.post(url, json={"up": False, "in_flight": 4, "operations": ["write"]}) as r:
                assert r.status == 200
            for _ in range(4):
                await c.event("BLOCK_IO_ERROR")
            async with http.post(url, json={"up": True}) as r:
                assert r.status == 200
            async with http.get(f"{base}/vms/compliant") as r:
                detail = await r.json()
            retry = [e for e in detail["event_counts"] if e["action"] == "retry"]
            assert retry and retry[0]["count"] >= 4
            async with http.post(f"{base}/vms/compliant/disks", json={"id": "virtio-disk9"}) as r:
                assert r.status == 200
            async with http.delete(f"{base}/vms/compliant/disks/virtio-disk9") as r:
                assert r.status == 200
            await c.event("DEVICE_DELETED")
            async with http.post(f"{base}/vms/compliant/kill") as r:
                assert r.status == 200
            assert not (short_tmp / "compliant.qmp").exists()
            async with http.post(f"{base}/vms/compliant/start") as r:
                assert r.status == 200
            assert (short_tmp / "compliant.qmp").exists()
            await c.close()
    finally:
        await runner.cleanup()
        await fleet.stop()
