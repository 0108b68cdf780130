"""qmpsim speaks QMP like QEMU 7.2: framing, negotiation, errors, shapes vs the real capture."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpsim import DiskSpec, HungServer, SimConfigError, SimVM

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qemu-7.2"


class RawClient:
    """A byte-level QMP client: records every line with its arrival time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.raw_lines: list[bytes] = []

    @classmethod
    async def connect(cls, path: str, negotiate: bool = True) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        c = cls(reader, writer)
        if negotiate:
            await c.line()
            await c.cmd("qmp_capabilities")
        return c

    async def line(self, timeout: float = 2.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout)
        self.raw_lines.append(raw)
        obj: dict[str, Any] = json.loads(raw)
        return obj

    async def send(self, obj: Any) -> None:
        self.writer.write(json.dumps(obj).encode() + b"\n")
        await self.writer.drain()

    async def cmd(self, execute: str, **kw: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": execute, "id": execute}
        if kw:
            msg["arguments"] = kw
        await self.send(msg)
        while True:
            obj = await self.line()
            if "event" not in obj:
                return obj

    async def close(self) -> None:
        self.writer.close()


def capture_replies() -> dict[str, Any]:
    """command name -> reply object, from the committed QEMU 7.2 transcript."""
    lines = (FIXTURES / "capture-transcript.txt").read_text().splitlines()
    out: dict[str, Any] = {}
    for i, line in enumerate(lines):
        if line.startswith(">> "):
            req = json.loads(line[3:])
            out.setdefault(req["execute"], json.loads(lines[i + 1]))
    return out


def shape(obj: Any) -> Any:
    """Keys (sorted) and JSON types, recursively."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [shape(obj[0])] if obj else []
    return type(obj).__name__


def disks() -> list[DiskSpec]:
    return [
        DiskSpec(id="disk0", werror="auto", rerror="auto", naming="drive", drive="drive0"),
        DiskSpec(
            id="scsi0-0-0-0",
            type="scsi-hd",
            werror="report",
            rerror="auto",
            naming="blockdev",
            node_name="node1",
        ),
    ]


@pytest.fixture
async def vm72(short_tmp: Path) -> Any:
    vm = SimVM(str(short_tmp / "q.sock"), name="capvm", retry_feature=False, disks=disks())
    await vm.start()
    yield vm
    await vm.kill()


async def test_greeting_bytes_and_line_ending(vm72: SimVM) -> None:
    reader, writer = await asyncio.open_unix_connection(vm72.socket_path)
    raw = await asyncio.wait_for(reader.readuntil(b"\n"), 2)
    real = (FIXTURES / "capture-transcript.txt").read_text().splitlines()[0]
    assert raw == real.encode() + b"\r\n"  # QEMU ends every line with CRLF (raw capture)
    stop_raw = (FIXTURES / "capture-stop-cont-raw.bin").read_bytes()
    assert stop_raw.startswith(raw)
    writer.close()


async def test_negotiation_and_errors_match_capture(vm72: SimVM) -> None:
    c = await RawClient.connect(vm72.socket_path, negotiate=False)
    await c.line()
    cap = capture_replies()
    assert await c.cmd("query-name") == cap["query-name"]  # before negotiation
    assert await c.cmd("qmp_capabilities") == cap["qmp_capabilities"]
    assert await c.cmd("query-name") == {"return": {"name": "capvm"}, "id": "query-name"}
    assert await c.cmd("nosuch") == cap["nosuch"]
    assert (await c.cmd("qmp_capabilities"))["error"] == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored",
    }
    assert (await c.cmd("qom-get"))["error"]["desc"] == "Parameter 'path' is missing"
    assert (await c.cmd("query-status", x=1))["error"]["desc"] == "Parameter 'x' is unexpected"
    await c.send({"execute": "query-status", "id": {"a": [1]}})
    reply = await c.line()
    assert reply == {"return": {"status": "running", "singlestep": False, "running": True}, "id": {"a": [1]}}
    assert list(reply) == ["return", "id"]
    await c.send({"exec": 1})
    assert (await c.line())["error"]["desc"] == "QMP input member 'exec' is unexpected"
    c.writer.write(b"garbage\n")
    assert (await c.line())["error"]["desc"] == "JSON parse error, invalid keyword 'garbage'"
    err = await c.cmd("qom-get", path="/machine/peripheral/nope", property="werror")
    assert err["error"]["class"] == "DeviceNotFound"
    assert list(err) == ["id", "error"]
    # every line the simulator wrote ends with CRLF
    assert all(raw.endswith(b"}\r\n") for raw in c.raw_lines)
    await c.close()


async def test_query_replies_match_capture(vm72: SimVM) -> None:
    c = await RawClient.connect(vm72.socket_path)
    cap = capture_replies()
    for cmd in ("query-version", "query-block", "query-blockstats"):
        got = await c.cmd(cmd)
        assert shape(got) == shape(cap[cmd]), cmd
    assert (await c.cmd("query-version"))["return"]["qemu"] == {"micro": 22, "minor": 2, "major": 7}
    blk = (await c.cmd("query-block"))["return"]
    real = cap["query-block"]["return"]
    for mine, theirs in zip(blk, real, strict=True):
        assert list(mine) == list(theirs)
        for key in ("io-status", "device", "qdev"):
            assert mine.get(key) == theirs.get(key)
        assert list(mine["inserted"]) == list(theirs["inserted"])
    assert blk[0]["inserted"]["node-name"].startswith("#block")
    assert blk[1]["inserted"]["node-name"] == "node1"
    stats = (await c.cmd("query-blockstats"))["return"]
    assert list(stats[0]) == list(cap["query-blockstats"]["return"][0])
    assert list(stats[0]["stats"])[:26] == list(cap["query-blockstats"]["return"][0]["stats"])
    for path, prop in (
        ("/machine/peripheral/disk0", "werror"),
        ("/machine/peripheral/disk0", "rerror"),
        ("/machine/peripheral/disk0/virtio-backend", "werror"),
        ("/machine/peripheral/scsi0-0-0-0", "werror"),
        ("/machine/peripheral/scsi0-0-0-0", "rerror"),
        ("/machine/peripheral/disk0", "retry_interval"),
        ("/machine/peripheral/nope", "werror"),
    ):
        got = await c.cmd("qom-get", path=path, property=prop)
        line = next(
            i
            for i, ln in enumerate((FIXTURES / "capture-transcript.txt").read_text().splitlines())
            if ln.startswith(">> ") and f'"path": "{path}", "property": "{prop}"' in ln
        )
        expect = json.loads((FIXTURES / "capture-transcript.txt").read_text().splitlines()[line + 1])
        assert got == expect, (path, prop)
    assert await c.cmd("qom-list", path="/machine/peripheral") == cap["qom-list"]
    props = await c.cmd("device-list-properties", typename="virtio-blk-pci")
    assert props == cap["device-list-properties"]
    await c.close()


async def test_retry_feature_properties(short_tmp: Path) -> None:
    spec = DiskSpec(id="virtio-disk0", werror="retry", rerror="retry", retry_interval_ms=2000,
                    retry_timeout_ms=10000)  # fmt: skip
    async with SimVM(str(short_tmp / "q.sock"), disks=[spec]) as vm:
        c = await RawClient.connect(vm.socket_path)
        ver = (await c.cmd("query-version"))["return"]
        assert ver == {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": "qemu-8.2.0-openEuler"}
        assert (await c.cmd("query-name"))["return"] == {}
        for typename in ("virtio-blk-pci", "scsi-hd"):
            props = (await c.cmd("device-list-properties", typename=typename))["return"]
            by_name = {p["name"]: p for p in props}
            assert by_name["retry_interval"]["type"] == "BlockdevRetryInterval"
            assert by_name["retry_timeout"]["type"] == "BlockdevRetryTimeout"
            assert by_name["werror"]["type"] == "BlockdevOnError"
        for path in ("/machine/peripheral/virtio-disk0", "/machine/peripheral/virtio-disk0/virtio-backend"):
            assert (await c.cmd("qom-get", path=path, property="werror"))["return"] == "retry"
            assert (await c.cmd("qom-get", path=path, property="retry_interval"))["return"] == 2000
            assert (await c.cmd("qom-get", path=path, property="retry_timeout"))["return"] == 10000
        blk = (await c.cmd("query-block"))["return"][0]
        assert "io-status" not in blk
        assert blk["qdev"] == "/machine/peripheral/virtio-disk0/virtio-backend"
        names = {x["name"] for x in (await c.cmd("query-commands"))["return"]}
        assert {"qom-get", "query-block", "cont", "device_del"} <= names
        await c.close()


async def test_without_feature(short_tmp: Path) -> None:
    with pytest.raises(SimConfigError, match="Parameter 'werror' does not accept value 'retry'"):
        SimVM(str(short_tmp / "q.sock"), retry_feature=False, disks=[DiskSpec(id="d", werror="retry")])
    vm = SimVM(str(short_tmp / "q.sock"), retry_feature=False,
               disks=[DiskSpec(id="scsi0-0-0-0", type="scsi-hd", werror="report")])  # fmt: skip
    async with vm:
        c = await RawClient.connect(vm.socket_path)
        err = await c.cmd("qom-get", path="/machine/peripheral/scsi0-0-0-0", property="retry_interval")
        assert err["error"] == {
            "class": "GenericError",
            "desc": "Property 'scsi-hd.retry_interval' not found",
        }
        props = (await c.cmd("device-list-properties", typename="scsi-hd"))["return"]
        assert "retry_interval" not in {p["name"] for p in props}
        await c.close()


async def test_one_client_at_a_time(vm72: SimVM) -> None:
    first = await RawClient.connect(vm72.socket_path)
    r2, w2 = await asyncio.open_unix_connection(vm72.socket_path)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r2.readuntil(b"\n"), 0.2)  # no greeting while the first is served
    await first.close()
    greeting = json.loads(await asyncio.wait_for(r2.readuntil(b"\n"), 2))
    assert "QMP" in greeting
    w2.close()


async def test_qemu_qmp_client_interop(short_tmp: Path) -> None:
    spec = DiskSpec(id="virtio-disk0", werror="retry", rerror="retry", retry_interval_ms=100)
    async with SimVM(str(short_tmp / "q.sock"), name="vm1", disks=[spec]) as vm:
        qmp = QMPClient("test")
        await qmp.connect(vm.socket_path)
        assert await qmp.execute("query-name") == {"name": "vm1"}
        assert await qmp.execute("query-status") == {
            "status": "running",
            "singlestep": False,
            "running": True,
        }
        with qmp.listener("BLOCK_IO_ERROR") as listener:
            vm.link_down("virtio-disk0")
            event = await asyncio.wait_for(listener.get(), 2)
        assert event["event"] == "BLOCK_IO_ERROR"
        assert event["data"] == {"device": "drive-virtio-disk0", "node-name": vm.disk("virtio-disk0").node_name,
                                 "reason": "Input/output error", "operation": "write", "action": "retry"}  # fmt: skip
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        vm.link_up("virtio-disk0")
        await qmp.disconnect()


async def test_block_io_error_shape_matches_real_qemu(short_tmp: Path) -> None:
    """Data keys in QEMU's order; nospace only when the iostatus is enabled (stop/enospc)."""
    real = [
        json.loads(ln)
        for f in ("capture-stop-cont-raw.bin", "capture-report-ignore-raw.bin")
        for ln in (FIXTURES / f).read_bytes().decode().split("\r\n")
        if "BLOCK_IO_ERROR" in ln and not ln.startswith(">>")
    ]
    real_stop = next(e for e in real if e["data"]["action"] == "stop")
    real_report = next(e for e in real if e["data"]["action"] == "report")
    specs = [
        DiskSpec(id="a", werror="stop", rerror="stop", naming="blockdev", node_name="nbd0"),
        DiskSpec(id="b", type="scsi-hd", werror="report", rerror="report", naming="blockdev",
                 node_name="nbd1"),
    ]  # fmt: skip
    async with SimVM(str(short_tmp / "q.sock"), disks=specs) as vm:
        c = await RawClient.connect(vm.socket_path)
        vm.link_down("a", operations=("read",))
        got_stop = await c.line()
        assert list(got_stop) == list(real_stop) and list(got_stop["data"]) == list(real_stop["data"])
        assert (await c.line())["event"] == "STOP"
        await c.cmd("stop")
        vm.link_down("b", operations=("read",))
        vm.link_up("a")
        await c.cmd("cont")
        while True:
            ev = await c.line()
            if ev.get("event") == "BLOCK_IO_ERROR":
                break
        assert list(ev["data"]) == list(real_report["data"])
        await c.close()


async def test_hung_server(short_tmp: Path) -> None:
    async with HungServer(str(short_tmp / "h.sock")) as hs:
        reader, writer = await asyncio.open_unix_connection(hs.path)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        writer.close()
    assert not (short_tmp / "h.sock").exists()


async def test_shutdown_quit_kill(short_tmp: Path) -> None:
    vm = SimVM(str(short_tmp / "q.sock"), disks=[DiskSpec(id="d0")])
    await vm.start()
    c = await RawClient.connect(vm.socket_path)
    await vm.shutdown()
    ev = await c.line()
    assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-signal"}
    assert await c.reader.read() == b""
    assert not sock_exists(vm.socket_path)
    await vm.start()  # like a restarted QEMU
    c = await RawClient.connect(vm.socket_path)
    await c.send({"execute": "quit"})
    assert (await c.line())["data"]["reason"] == "host-qmp-quit"
    assert await c.line() == {"return": {}}
    assert await asyncio.wait_for(c.reader.read(), 2) == b""
    await vm.start()
    c = await RawClient.connect(vm.socket_path)
    await vm.kill()
    assert await asyncio.wait_for(c.reader.read(), 2) == b""
    assert not sock_exists(vm.socket_path)


def sock_exists(path: str) -> bool:
    return os.path.exists(path)
