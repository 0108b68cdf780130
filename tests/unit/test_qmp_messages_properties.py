"""Property tests: arbitrary QMP messages never break the exporter.

Whatever a peer sends (random keys, wrong types, missing data, unicode, deep nesting, big
integers), the functions that read QMP data never raise and every label they produce stays in
its bounded set.  In-process on `VMState.match_disk`, `parse_blockstats` and
`device_from_qdev`; events through a real unix socket: a fake QEMU sends the generated events to
a real `VMWatcher` (qemu.qmp client, the real hang tracker as sink), which must count every one
of them without an internal error, both in one long session and right after connecting.

Integers include values far beyond 64 bits (valid JSON that no float can hold) and event names
may be any JSON value: both once raised (OverflowError, TypeError) and are regression-tested in
tests/sim/test_regressions.py too.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.exposition.cache import ExporterCollector
from exporter.hang.tracking import HangTracking
from exporter.model.events import IO_ACTIONS, IO_OPERATIONS, KNOWN_EVENTS, VMEvent
from exporter.model.policy import DiskPolicy, PolicyConfig, verify
from exporter.model.sink import EventSink
from exporter.model.state import BlockStats, Disk, VMState
from exporter.qmp.messages import HeldIOError, decode_message
from exporter.qmp.replies import device_from_qdev, parse_blockstats
from exporter.qmp_watch import VMWatcher
from tests.sim.servers import DISK_NODE, DISK_QDEV, Sends, watching
from tests.support.waits import wait_for

INT64 = st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.integers(min_value=10**300))
SCALARS = st.one_of(st.none(), st.booleans(), INT64, st.floats(allow_nan=False), st.text(max_size=20))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KNOWN_KEYS = st.sampled_from(
    ["node-name", "device", "qom-path", "operation", "action", "reason", "nospace", "path", "guest"]
)
# Event names: mostly real ones, but any JSON value may arrive from a broken peer.
NAMES = st.one_of(
    st.sampled_from(sorted(KNOWN_EVENTS)), st.just("BLOCK_IO_ERROR"), st.text(max_size=15), JSON
)
# Values that sometimes hit the real disk, so that matching paths are exercised too.
HITS = st.sampled_from([DISK_NODE, "drive-virtio-disk0", "/machine/peripheral/virtio-disk0", DISK_QDEV])
DATA = st.one_of(
    JSON,
    st.dictionaries(st.one_of(KNOWN_KEYS, st.text(max_size=8)), st.one_of(HITS, JSON), max_size=6),
)
TIMESTAMP = st.one_of(
    JSON,
    st.fixed_dictionaries({"seconds": st.one_of(INT64, JSON), "microseconds": st.one_of(INT64, JSON)}),
    st.fixed_dictionaries(
        {
            "seconds": st.integers(
                min_value=time.time_ns() // 10**9 - 100, max_value=time.time_ns() // 10**9 + 100
            ),
            "microseconds": st.integers(0, 999999),
        }
    ),
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    ev: dict[str, Any] = {"event": draw(NAMES)}
    if draw(st.booleans()):
        ev["data"] = draw(DATA)
    if draw(st.booleans()):
        ev["timestamp"] = draw(TIMESTAMP)
    for key, value in draw(st.dictionaries(st.text(max_size=8), JSON, max_size=2)).items():
        ev.setdefault(key, value)
    return ev


def disk() -> Disk:
    policy = DiskPolicy(
        werror="retry", rerror="retry", retry_interval_ms=1000, retry_timeout_ms=10000, retry_feature=True
    )
    return Disk(
        device="virtio-disk0",
        drive="drive-virtio-disk0",
        node_name=DISK_NODE,
        qdev=DISK_QDEV,
        qom_path="/machine/peripheral/virtio-disk0",
        qdev_type="virtio-blk",
        policy=policy,
        verdict=verify(policy, PolicyConfig()),
    )


def assert_bounded(vm: VMState) -> None:
    assert set(vm.events) <= KNOWN_EVENTS | {"other"}
    for dev, op, action in vm.io_errors:
        assert dev == "virtio-disk0"  # the only disk (the list is cleared when a session ends)
        assert op in IO_OPERATIONS | {"other"}
        assert action in IO_ACTIONS | {"other"}
    assert isinstance(vm.status, str)
    assert all(n >= 0 for n in vm.events.values())


@settings(max_examples=300, deadline=None)
@given(DATA)
def test_match_disk_finds_a_known_disk_or_nothing(data: Any) -> None:
    vm = VMState.qmp("/run/x/vm.qmp")
    vm.set_disks({"virtio-disk0": disk()})
    got = vm.match_disk(data if isinstance(data, dict) else {})
    assert got in (None, "virtio-disk0")


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.one_of(
            st.sampled_from(["rd_bytes", "wr_operations", "idle_time_ns", "rd_total_time_ns"]),
            st.text(max_size=10),
        ),
        JSON,
    )
)
def test_parse_blockstats_never_raises(stats: dict[str, Any]) -> None:
    bs = parse_blockstats(stats)
    assert isinstance(bs, BlockStats)
    assert isinstance(bs.ok_ops, int)
    assert bs.idle_s is None or isinstance(bs.idle_s, float)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_device_from_qdev_never_raises(qdev: str) -> None:
    device, path = device_from_qdev(qdev)
    assert isinstance(device, str) and isinstance(path, str)


# -- through a real socket -------------------------------------------------------------------


class CurrentTracker(EventSink):
    """Hands what the watcher reports to `hangs`, a fresh hang tracker for each example."""

    def __init__(self) -> None:
        self.hangs = HangTracking(1.0)

    def on_disks(self, vm: VMState, now: float) -> None:
        self.hangs.on_disks(vm, now)

    def on_event(self, vm: VMState, event: VMEvent) -> None:
        self.hangs.on_event(vm, event)

    def on_session_start(self, vm: VMState, now: float) -> None:
        self.hangs.on_session_start(vm, now)

    def on_session_end(self, vm: VMState, now: float, vm_gone: bool) -> None:
        self.hangs.on_session_end(vm, now, vm_gone)


async def until_counted(vm: VMState, n: int) -> None:
    """Wait until ``vm`` has counted ``n`` events; fail at once if its session broke."""

    async def counted() -> bool:
        if vm.internal_errors or vm.connect_attempts != 1:
            raise RuntimeError(
                f"the session broke: {vm.internal_errors} internal errors, {vm.connect_attempts} connects"
            )
        return sum(vm.events.values()) >= n

    await wait_for(counted, 10, f"{n} events counted", step=0.002)


@pytest.fixture
async def session(short_tmp: Path) -> AsyncIterator[tuple[VMWatcher, Sends, CurrentTracker]]:
    """One session for every example of a test.  It polls only when an event asks for it, and
    commands never time out: between examples the event loop stands still."""
    sink, srv = CurrentTracker(), Sends(str(short_tmp / "vm.qmp"), "vm")
    async with watching(srv, sink, poll_interval_seconds=3600, command_timeout_seconds=3600) as w:

        async def watched() -> bool:
            return srv.watched is not None

        await wait_for(watched, 10, "the watched connection")
        yield w, srv, sink


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(evs=st.lists(events(), max_size=20))
async def test_events_never_break_a_session_and_labels_stay_bounded(
    session: tuple[VMWatcher, Sends, CurrentTracker], evs: list[dict[str, Any]]
) -> None:
    """Every example's events go down the same session (what came before stays): each is
    counted, none ends the session, labels stay bounded, and a fresh hang tracker fed them
    ticks and collects."""
    w, srv, sink = session
    assert srv.watched is not None
    now = time.time()
    sink.hangs = HangTracking(1.0)
    sink.hangs.on_disks(w.vm, now)
    before = sum(w.vm.events.values())
    for ev in evs:
        await srv.watched.send(ev)
    await until_counted(w.vm, before + len(evs))
    assert sum(w.vm.events.values()) == before + len(evs)
    assert_bounded(w.vm)
    sink.hangs.tick(now + 1)
    sink.hangs.tick(now + 100)
    collector = ExporterCollector(lambda: [w.vm], hangs=sink.hangs, clock=lambda: now + 100)
    list(collector.collect())
    collector.render("text")


async def _through_socket(evs: list[dict[str, Any]]) -> VMState:
    with tempfile.TemporaryDirectory(prefix="qih-prop-", dir="/tmp") as d:
        async with watching(Sends(os.path.join(d, "vm.qmp"), "vm", evs), HangTracking(1.0)) as w:
            await until_counted(w.vm, len(evs))
            await asyncio.sleep(0.05)  # anything more (a crash, a reconnect) would show now
        return w.vm


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), min_size=1, max_size=30))
def test_events_through_a_real_socket(evs: list[dict[str, Any]]) -> None:
    """A fresh session per example: the events come right after it is established."""
    vm = asyncio.run(_through_socket(evs))
    assert sum(vm.events.values()) == len(evs)
    assert vm.internal_errors == 0
    assert vm.connect_attempts == 1  # one session: no event broke it
    assert_bounded(vm)


#: Well-formed BLOCK_IO_ERRORs (what is held compactly), their fields hitting the disk or not.
IO_ERRORS = st.fixed_dictionaries(
    {
        "event": st.just("BLOCK_IO_ERROR"),
        "timestamp": st.dictionaries(st.sampled_from(["seconds", "microseconds"]), st.one_of(INT64, JSON)),
        "data": st.dictionaries(KNOWN_KEYS, st.one_of(HITS, JSON), max_size=6),
    }
)


@given(st.one_of(events(), IO_ERRORS))
@settings(max_examples=500, deadline=None)
def test_an_event_held_during_connect_decodes_as_it_came(event: dict[str, Any]) -> None:
    """Events that arrive while a session is established are held compactly (`HeldIOError`,
    names interned, unread fields dropped) and decoded once the disks are known: to exactly
    what the message itself decodes to, matched disk included."""
    vm = VMState.qmp("/run/vm.qmp")
    vm.set_disks({"virtio-disk0": disk()})
    held = HeldIOError.hold(event)
    if isinstance(held, HeldIOError):
        assert held.typed(vm) == decode_message(event, vm)
    else:
        assert held is event
