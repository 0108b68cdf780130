"""The simulator's QMP replies have the shape of a real QEMU 7.2's (domain.md §2, §5).

A real upstream QEMU (no retry feature) and a SimVM configured like it (``retry_feature=False``,
the same disks, werror/rerror, name and uuid) get the same commands over a raw QMP connection.
Replies are compared by shape: the same keys at every level and the same JSON types; values
that must match (qdev paths, device ids, policies, status, error classes) exactly.  The raw
framing (line terminator, key order of replies and events) is compared byte for byte.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qmpsim import DiskSpec, SimVM
from tests.qemu.compare import QMP_TERMINATOR, key_order_diff, shape_diff
from tests.qemu.rawqmp import Line, RawQMP, raw_qmp
from tests.support.qemu import blank_image, run_qemu

pytestmark = pytest.mark.qemu

NAME = "shapevm"
UUID = "6a1c1f4e-3b8e-4d55-9a3a-2f6c2e1d7b90"
VIRTIO, SCSI = "virtio-disk0", "scsi0-0-0-0"
VIRTIO_DRIVE = f"drive-{VIRTIO}"
SCSI_NODE = f"node-{SCSI}"
SIZE = 1 << 20
VIRTIO_POLICY = {"werror": "stop", "rerror": "stop"}  # io-status shown
SCSI_POLICY = {"werror": "report", "rerror": "ignore"}  # io-status absent

#: values that must be the same on both sides, in query-block / query-blockstats
BLOCK_EXACT = (
    "$/#",
    "$/*/device",
    "$/*/qdev",
    "$/*/io-status",
    "$/*/type",
    "$/*/locked",
    "$/*/removable",
    f"$/{1}/inserted/node-name",  # -blockdev: named by us (the -drive node is auto-generated)
    "$/*/inserted/drv",
    "$/*/inserted/ro",
    "$/*/inserted/image/format",
    "$/*/inserted/image/virtual-size",
    "$/*/inserted/backing_file_depth",
)


def qemu_args(d: Path) -> list[str]:
    img1, img2 = blank_image(d / "virtio.img", SIZE), blank_image(d / "scsi.img", SIZE)
    vp = ",".join(f"{k}={v}" for k, v in VIRTIO_POLICY.items())
    sp = ",".join(f"{k}={v}" for k, v in SCSI_POLICY.items())
    return [
        "-uuid", UUID,
        "-drive", f"file={img1},format=raw,if=none,id={VIRTIO_DRIVE}",
        "-device", f"virtio-blk-pci,drive={VIRTIO_DRIVE},id={VIRTIO},{vp}",
        "-device", "virtio-scsi-pci,id=scsi0",
        "-blockdev", f"driver=file,filename={img2},node-name={SCSI_NODE}-file",
        "-blockdev", f"driver=raw,file={SCSI_NODE}-file,node-name={SCSI_NODE}",
        "-device", f"scsi-hd,bus=scsi0.0,drive={SCSI_NODE},id={SCSI},{sp}",
    ]  # fmt: skip


def sim_vm(d: Path) -> SimVM:
    return SimVM(
        str(d / "sim.qmp"),
        name=NAME,
        uuid=UUID,
        retry_feature=False,
        disks=[
            DiskSpec(id=VIRTIO, **VIRTIO_POLICY, naming="drive", size=SIZE, in_flight=0,
                     filename=str(d / "virtio.img")),
            DiskSpec(id=SCSI, type="scsi-hd", **SCSI_POLICY, naming="blockdev", node_name=SCSI_NODE,
                     size=SIZE, in_flight=0, filename=str(d / "scsi.img")),
        ],
    )  # fmt: skip


@dataclass
class Pair:
    """The same exchange with a real QEMU and with the simulator."""

    real: RawQMP
    sim: RawQMP
    greetings: tuple[Line, Line]

    async def both(
        self, command: str, arguments: dict[str, Any] | None = None, id: Any = None
    ) -> tuple[Line, Line]:
        r = await self.real.execute(command, arguments, id)
        s = await self.sim.execute(command, arguments, id)
        return r, s

    async def negotiate(self) -> None:
        r, s = await self.both("qmp_capabilities")
        assert r.obj == s.obj == {"return": {}}, (r, s)


@pytest.fixture
async def pair(short_tmp: Path) -> AsyncIterator[Pair]:
    with run_qemu(short_tmp, short_tmp / "real.qmp", qemu_args(short_tmp), name=NAME):
        async with contextlib.AsyncExitStack() as stack:
            sim = await stack.enter_async_context(sim_vm(short_tmp))
            assert sim.running
            real, rg = await stack.enter_async_context(raw_qmp(short_tmp / "real.qmp"))
            simc, sg = await stack.enter_async_context(raw_qmp(short_tmp / "sim.qmp"))
            yield Pair(real, simc, (rg, sg))


def check(r: Line, s: Line, exact: tuple[str, ...] = (), what: str = "") -> None:
    """Same framing and same shape (``exact`` paths equal)."""
    diffs = [f"{what}: {d}" for d in shape_diff(r.obj, s.obj, exact)]
    for line, side in ((r, "QEMU"), (s, "qmpsim")):
        if not line.raw.endswith(QMP_TERMINATOR):
            diffs.append(f"{what}: {side} line ends {line.raw[-2:]!r}")
    assert not diffs, "\n".join(diffs)


async def test_greeting_and_negotiation(pair: Pair) -> None:
    rg, sg = pair.greetings
    check(rg, sg, ("$/QMP/capabilities",), "greeting")
    assert key_order_diff(rg.raw, sg.raw, "greeting") == []
    # before qmp_capabilities every other command is refused
    r, s = await pair.both("query-status")
    check(r, s, ("$/error/class", "$/error/desc"), "query-status before negotiation")
    assert r.obj["error"]["class"] == "CommandNotFound"
    await pair.negotiate()
    r, s = await pair.both("qmp_capabilities")
    check(r, s, ("$/error/class", "$/error/desc"), "second qmp_capabilities")


async def test_identity_and_status(pair: Pair) -> None:
    await pair.negotiate()
    for command, exact in (
        ("query-name", ("$/return",)),
        ("query-uuid", ("$/return",)),
        ("query-version", ()),
        ("query-status", ("$/return",)),
    ):
        r, s = await pair.both(command)
        check(r, s, exact, command)
    assert r.obj["return"]["status"] == "running"
    # query-version is the greeting's version object
    r, s = await pair.both("query-version")
    assert s.obj["return"] == pair.greetings[1].obj["QMP"]["version"]
    assert r.obj["return"] == pair.greetings[0].obj["QMP"]["version"]


async def test_query_block(pair: Pair) -> None:
    await pair.negotiate()
    r, s = await pair.both("query-block")
    check(r, s, tuple(f"$/return{p[1:]}" for p in BLOCK_EXACT), "query-block")
    (virtio, scsi) = r.obj["return"]
    assert (virtio["device"], virtio["qdev"]) == (
        VIRTIO_DRIVE,
        f"/machine/peripheral/{VIRTIO}/virtio-backend",
    )
    assert (scsi["device"], scsi["qdev"], scsi["inserted"]["node-name"]) == ("", SCSI, SCSI_NODE)
    # the -drive node name is auto-generated on both sides ("#blockNNN")
    assert s.obj["return"][0]["inserted"]["node-name"].startswith("#block")
    assert virtio["inserted"]["node-name"].startswith("#block")


async def test_query_blockstats(pair: Pair) -> None:
    await pair.negotiate()
    r, s = await pair.both("query-blockstats")
    exact = ("$/return/#", "$/return/*/device", "$/return/*/qdev", "$/return/1/node-name",
             "$/return/1/parent/node-name", "$/return/*/parent/driver-specific/driver",
             "$/return/*/stats/timed_stats", "$/return/*/stats/account_*",
             "$/return/*/parent/stats/account_*")  # fmt: skip
    check(r, s, exact, "query-blockstats")


@pytest.mark.parametrize(
    "path",
    [
        f"/machine/peripheral/{VIRTIO}",
        f"/machine/peripheral/{VIRTIO}/virtio-backend",
        f"/machine/peripheral/{SCSI}",
    ],
)
async def test_qom_get(pair: Pair, path: str) -> None:
    await pair.negotiate()
    for prop in ("werror", "rerror", "type", "retry_interval", "retry_timeout", "no-such-property"):
        r, s = await pair.both("qom-get", {"path": path, "property": prop})
        check(r, s, ("$/return", "$/error/class", "$/error/desc"), f"qom-get {path} {prop}")
    # upstream QEMU: the policy is readable, the retry properties are not (domain.md §2)
    r, _ = await pair.both("qom-get", {"path": path, "property": "werror"})
    assert r.obj["return"] in ("stop", "report"), r.obj
    r, _ = await pair.both("qom-get", {"path": path, "property": "retry_interval"})
    assert r.obj["error"]["class"] == "GenericError", r.obj
    r, s = await pair.both("qom-get", {"path": "/machine/peripheral/nodisk", "property": "type"})
    check(r, s, ("$/error/class", "$/error/desc"), "qom-get of a missing device")


async def test_device_list_properties(pair: Pair) -> None:
    await pair.negotiate()
    r, s = await pair.both("device-list-properties", {"typename": "no-such-device"})
    check(r, s, ("$/error/class",), "device-list-properties of a missing type")
    for typename in ("virtio-blk-pci", "scsi-hd"):
        r, s = await pair.both("device-list-properties", {"typename": typename})
        check(r, s, ("$/return/#",), f"device-list-properties {typename}")
        names = [sorted(p["name"] for p in line.obj["return"]) for line in (r, s)]
        assert names[0] == names[1], f"{typename}: QEMU {names[0]} != qmpsim {names[1]}"
        assert "retry_interval" not in names[1]


async def test_error_replies(pair: Pair) -> None:
    await pair.negotiate()
    exact = ("$/error/class", "$/error/desc", "$/id")
    r, s = await pair.both("no-such-command")
    check(r, s, exact, "unknown command")
    assert r.obj["error"]["class"] == "CommandNotFound"
    r, s = await pair.both("no-such-command", id="x1")
    check(r, s, exact, "unknown command with id")
    assert key_order_diff(r.raw, s.raw, "unknown command with id") == []
    r, s = await pair.both("qom-get", {"path": f"/machine/peripheral/{VIRTIO}"})
    check(r, s, exact, "qom-get without property")


async def test_framing_and_key_order(pair: Pair) -> None:
    await pair.negotiate()
    diffs: list[str] = []
    for command, args in (("query-status", None), ("query-block", None), ("query-blockstats", None)):
        r, s = await pair.both(command, args, id={"n": 7})
        assert r.keys() == s.keys() == ["return", "id"], (r.raw, s.raw)
        diffs += key_order_diff(r.raw, s.raw, command)
    # events: STOP and RESUME (no data), RESET (with data)
    for command, event in (("stop", "STOP"), ("cont", "RESUME"), ("system_reset", "RESET")):
        r, s = await pair.both(command, id=1)
        assert r.obj == s.obj == {"return": {}, "id": 1}, (r.raw, s.raw)
        assert r.keys() == s.keys() == ["return", "id"]
        re, se = await pair.real.wait_event(event), await pair.sim.wait_event(event)
        check(re, se, ("$/event", "$/data"), event)
        assert re.keys() == se.keys(), (re.raw, se.raw)
        diffs += key_order_diff(re.raw, se.raw, event)
        for line in (re, se):
            assert json.loads(line.raw) == line.obj
    assert not diffs, "\n".join(diffs)


def test_the_comparison_is_not_vacuous() -> None:
    """The helpers do report differences: keys, types, exact values, list lengths, key order."""
    real = {"return": [{"a": 1, "b": "x", "c": True}], "id": 1}
    sim = {"return": [{"a": "1", "b": "y", "d": None}], "id": 1}
    diffs = shape_diff(real, sim, ("$/return/*/b",))
    assert diffs == [
        "$/return/0/c: only in QEMU (True)",
        "$/return/0/d: only in qmpsim (None)",
        "$/return/0/a: QEMU has number 1, qmpsim has string '1'",
        "$/return/0/b: QEMU 'x' != qmpsim 'y'",
    ]
    assert shape_diff([1, 2], [3], ("$/#",)) == ["$: QEMU has 2 elements, qmpsim 1"]
    assert key_order_diff(b'{"a": {"x": 1, "y": 2}}', b'{"a": {"y": 2, "x": 1}}', "t") == [
        "t $/a: QEMU key order ['x', 'y'] != qmpsim ['y', 'x']"
    ]
