"""The pure parts of the libvirt source: run states, getAllDomainStats block fields, and the
model's disks built from a domain's live XML (real libvirt 9.0 fixture)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.config import Config
from exporter.libvirt.domxml import parse_definition, parse_domain
from exporter.libvirt.translate import blockstats_by_target, model_disks, qemu_version, run_state
from exporter.model.policy import PolicyConfig, Rule
from exporter.model.state import VMState

OPENEULER_DISK = """
<domain type='kvm' id='3'>
  <name>web-1</name>
  <uuid>0b6a8e2c-4d7b-4f0e-9a63-2f1c1e5c7a10</uuid>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native' error_policy='retry' rerror_policy='retry' retry_interval='2000' retry_timeout='10000'/>
      <source protocol='nbd' name='export' index='2'>
        <host name='10.0.0.5' port='10809'/>
      </source>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/data.qcow2' index='1'/>
      <backingStore type='file' index='3'>
        <format type='raw'/>
        <source file='/var/lib/libvirt/images/base.raw'/>
      </backingStore>
      <target dev='sda' bus='scsi'/>
      <alias name='ua-data'/>
    </disk>
  </devices>
</domain>
"""


def test_run_states_read_like_query_status() -> None:
    assert run_state(1, 1) == "running"
    assert run_state(3, 5) == "io-error"  # VIR_DOMAIN_PAUSED / VIR_DOMAIN_PAUSED_IOERROR
    assert run_state(3, 1) == "paused"
    assert run_state(5, 1) == "shutdown"
    assert run_state(7, 0) == "suspended"
    assert run_state(0, 0) == ""


def test_blockstats_by_target_keeps_the_top_image_and_ignores_garbage() -> None:
    stats = {
        "block.count": 3,
        "block.0.name": "vda",
        "block.0.rd.reqs": 10,
        "block.0.wr.reqs": 4,
        "block.0.fl.reqs": 1,
        "block.0.rd.bytes": 4096,
        "block.0.wr.times": 2_000_000_000,
        "block.1.name": "vda",  # a backing-chain entry of the same disk
        "block.1.rd.reqs": 999,
        "block.2.name": "sda",
        "block.2.rd.reqs": -1,  # not a counter value
        "block.2.wr.reqs": True,
    }
    got = blockstats_by_target(stats)
    assert set(got) == {"vda", "sda"}
    assert (got["vda"].read_ops, got["vda"].write_ops, got["vda"].flush_ops) == (10, 4, 1)
    assert got["vda"].ok_ops == 15
    assert got["vda"].read_bytes == 4096 and got["vda"].write_time_s == 2.0
    assert got["sda"].ok_ops == 0
    assert blockstats_by_target({"block.count": "x"}) == {}


def test_qemu_version_from_libvirt_number() -> None:
    assert qemu_version(7_002_009) == "7.2.9"
    assert qemu_version(0) == ""


def test_model_disks_match_every_node_of_the_chain_and_verify_the_policy() -> None:
    disks = model_disks(parse_domain(OPENEULER_DISK), Config(policy=PolicyConfig(max_timeout_seconds=60)))
    vda, data = disks["virtio-disk0"], disks["ua-data"]
    assert vda.verdict.ok and vda.policy.retry_timeout_ms == 10000
    assert vda.qdev_type == "virtio-blk" and data.qdev_type == "scsi-hd"
    assert set(data.verdict.violations) == {Rule.WERROR_NOT_RETRY, Rule.RERROR_NOT_RETRY}

    vm = VMState(key="libvirt:x", socket="qemu:///system", source="libvirt")
    vm.set_disks(disks)
    # -blockdev: BLOCK_IO_ERROR names a node of the chain and an empty device.
    assert vm.match_disk({"device": "", "node-name": "libvirt-2-format"}) == "virtio-disk0"
    assert vm.match_disk({"device": "", "node-name": "libvirt-2-storage"}) == "virtio-disk0"
    assert vm.match_disk({"device": "", "node-name": "libvirt-3-storage"}) == "ua-data"
    # -drive (older libvirt): the drive id; QEMU >= 9.2 also names the device by QOM path.
    assert vm.match_disk({"device": "drive-ua-data", "node-name": "#block123"}) == "ua-data"
    assert vm.match_disk({"qom-path": "/machine/peripheral/virtio-disk0/virtio-backend"}) == "virtio-disk0"
    assert vm.match_disk({"device": "", "node-name": "libvirt-9-format"}) is None


def test_real_libvirt_xml_fixture_parses() -> None:
    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    xmls = sorted(fixtures.glob("libvirt*/*.xml"))
    assert xmls, "no libvirt XML fixtures"
    for path in xmls:
        if path.name in ("seed-disks.xml", "seed-vm.xml"):  # written before `virsh define`: no <uuid>
            dom = parse_definition(path.read_text(), name=path.stem)
            assert dom.name and not dom.uuid and dom.disks
            continue
        dom = parse_domain(path.read_text())
        assert dom.name and dom.uuid


def test_one_per_vm_prefers_a_live_qmp_session_and_never_repeats_a_name() -> None:
    from exporter.model.state import one_per_vm

    def vm(key: str, name: str, uuid: str, up: bool, source: str = "qmp") -> VMState:
        v = VMState(key=key, source=source)
        v.name, v.uuid, v.up = name, uuid, up
        return v

    both_qmp = vm("/s/a.qmp", "a", "u-a", True)
    both_lv = vm("libvirt:u-a", "a", "u-a", True, "libvirt")
    down_qmp = vm("/s/b.qmp", "b", "", False)  # its session ended: UUID unknown now
    b_lv = vm("libvirt:u-b", "b", "u-b", True, "libvirt")
    only_qmp = vm("/s/c.qmp", "c", "u-c", False)
    only_lv = vm("libvirt:u-d", "d", "u-d", False, "libvirt")
    got = one_per_vm([both_qmp, down_qmp, only_qmp], [both_lv, b_lv, only_lv])
    assert got == [both_qmp, only_qmp, b_lv, only_lv]
    assert len({v.vm for v in got}) == len(got)


async def _turns_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop turn, one turn at a time, until ``check`` holds (the first hand-over comes
    `EventInbox.HANDOVER_S` after the first item, then a batch per turn)."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("the inbox handed nothing over in time")
        await asyncio.sleep(0)


async def test_inbox_hands_a_burst_over_in_order_a_batch_per_turn() -> None:
    """A burst queued at once (libvirt's thread is faster than the loop in a storm) reaches the
    loop in order, a batch per turn, so other tasks (a scrape) run in between."""
    import asyncio
    import itertools
    import time

    from exporter.libvirt.inbox import EventInbox

    got: list[int] = []
    inbox = EventInbox(asyncio.get_running_loop(), lambda item: got.append(item[0]), time.time)
    n = EventInbox.BATCH * 3 + 5
    for i in range(n):  # all queued before the loop runs the first drain
        inbox.put((i,))
    seen: list[int] = []
    while len(got) < n:
        seen.append(len(got))
        await asyncio.sleep(0)
    seen.append(len(got))
    assert got == list(range(n))
    steps = [b - a for a, b in itertools.pairwise(seen) if b != a]
    assert len(steps) >= 4 and max(steps) <= EventInbox.BATCH, steps


async def test_events_waiting_in_the_inbox_hold_the_stream_position_back() -> None:
    """The inbox is the libvirt VMs' stream position: the time its waiting events cover is not
    silence (docs/hangs.md)."""
    import asyncio
    import threading

    from exporter.libvirt.inbox import EventInbox

    loop = asyncio.get_running_loop()
    clock = [100.0]
    handled: list[tuple[object, ...]] = []
    inbox = EventInbox(loop, handled.append, lambda: clock[0])
    assert inbox.read_through(105.0) == 105.0  # nothing waits: read up to now

    def libvirt_thread() -> None:  # libvirt's event thread, while the loop is busy
        for i in range(EventInbox.BATCH + 10):
            clock[0] = 101.0 + i / 1000
            inbox.put(("qemu", i))

    t = threading.Thread(target=libvirt_thread)
    t.start()
    t.join()
    assert handled == []
    assert inbox.read_through(105.0) == 101.0  # the oldest waiting event arrived then
    await _turns_until(lambda: bool(handled))  # the hand-over: one batch handled
    assert len(handled) == EventInbox.BATCH
    assert inbox.read_through(105.0) == 101.0 + EventInbox.BATCH / 1000  # the next one waiting
    await asyncio.sleep(0)
    assert len(handled) == EventInbox.BATCH + 10
    assert inbox.read_through(105.0) == 105.0
    assert [item[1] for item in handled] == list(range(EventInbox.BATCH + 10))  # in order


def _error(op: str = "write", action: str = "retry", node: str = "libvirt-1-format") -> str:
    """A BLOCK_IO_ERROR's data as libvirt forwards it (compact JSON text: the fixture's)."""
    return (
        f'{{"device":"","node-name":"{node}","reason":"Input/output error",'
        f'"operation":"{op}","action":"{action}"}}'
    )


def _parts(ts: float) -> tuple[int, int]:
    micros = round(ts * 1e6)
    return micros // 1_000_000, micros % 1_000_000


async def _drained(inbox: Any) -> None:
    """Let the loop turn until the inbox is empty (a batch per turn)."""
    await _turns_until(lambda: not inbox.waiting)


async def test_a_backlog_costs_one_entry_per_disk_with_exact_counts_and_times() -> None:
    """While the loop is behind, an outage's errors join one waiting run per disk instead of
    queueing one item each (issue 26): 40,000 events of 4 disks wait as a few hundred entries,
    and what is handed over says exactly how many, first, last and the largest gap."""
    import asyncio

    from exporter.libvirt.inbox import ErrorRun, EventInbox

    got: list[tuple[object, ...] | ErrorRun] = []
    inbox = EventInbox(asyncio.get_running_loop(), got.append, lambda: 1000.0, merge_gap=1.0)
    disks = [("dom-a", _error(node="libvirt-1-format")), ("dom-a", _error("read", node="libvirt-1-format")),
             ("dom-b", _error(node="libvirt-2-format")), ("dom-b", _error(action="report"))]  # fmt: skip
    sent: dict[tuple[str, str], list[float]] = {d: [] for d in disks}
    for i in range(10_000):  # all queued before the loop runs once: the loop is behind
        for k, (uuid, details) in enumerate(disks):
            ts = 900.0 + i * 0.001 + k * 1e-5 + (0.5 if i > 5000 else 0.0)  # one longer gap
            sent[(uuid, details)].append(ts)
            inbox.put_event(1, uuid, "BLOCK_IO_ERROR", *_parts(ts), details)
    assert inbox.waiting <= EventInbox.COALESCE_AFTER + len(disks)
    assert inbox.coalesced == 40_000 - inbox.waiting
    await _drained(inbox)
    runs: dict[tuple[str, str], list[tuple[int, float, float, float]]] = {d: [] for d in disks}
    for item in got:
        if isinstance(item, ErrorRun):
            runs[(item.uuid, item.details)].append((item.count, item.first, item.last, item.max_gap))
        else:
            _k, _s, uuid, _name, sec, us, details = item
            runs[(uuid, details)].append((1, sec + us / 1e6, sec + us / 1e6, 0.0))
    for disk, times in sent.items():
        assert sum(n for n, *_ in runs[disk]) == len(times)
        assert [r[1] for r in runs[disk]] == sorted(r[1] for r in runs[disk])  # in order
        assert abs(runs[disk][0][1] - times[0]) < 1e-6 and abs(runs[disk][-1][2] - times[-1]) < 1e-6
        assert abs(max(r[3] for r in runs[disk]) - 0.501) < 1e-6


async def test_a_domains_other_events_are_never_overtaken_by_its_errors() -> None:
    """STOP (or any other event of the domain) closes its runs: errors after it are handed over
    after it.  A stop error is never joined (each pauses the VM), nor are errors further apart
    than the margin (a gap that long may be silence)."""
    import asyncio

    from exporter.libvirt.inbox import ErrorRun, EventInbox

    got: list[tuple[object, ...] | ErrorRun] = []
    inbox = EventInbox(asyncio.get_running_loop(), got.append, lambda: 1000.0, merge_gap=1.0)
    for i in range(EventInbox.COALESCE_AFTER):  # another domain's events: the loop is behind
        inbox.put_event(1, "dom-x", "RTC_CHANGE", *_parts(900.0 + i * 1e-4), None)
    order = [("retry", 901.0), ("retry", 901.1), ("STOP", 901.2), ("retry", 901.3), ("retry", 901.4),
             ("retry", 903.0), ("stop", 903.1), ("stop", 903.2)]  # fmt: skip
    for what, ts in order:
        if what == "STOP":
            inbox.put_event(1, "dom-a", "STOP", *_parts(ts), None)
        else:
            inbox.put_event(1, "dom-a", "BLOCK_IO_ERROR", *_parts(ts), _error(action=what))
    await _drained(inbox)
    mine = [item for item in got if isinstance(item, ErrorRun) or item[2] == "dom-a"]
    seen = [
        ("run", item.count, item.first)
        if isinstance(item, ErrorRun)
        else (item[3], 1, item[4] + item[5] / 1e6)
        for item in mine
    ]
    assert [(w, n) for w, n, _ in seen] == [
        ("run", 2), ("STOP", 1), ("run", 2), ("run", 1), ("BLOCK_IO_ERROR", 1), ("BLOCK_IO_ERROR", 1)
    ]  # fmt: skip
    assert [round(t, 3) for _w, _n, t in seen] == [901.0, 901.2, 901.3, 903.0, 903.1, 903.2]


async def test_the_stream_position_follows_qemu_time_until_the_stream_is_quiet() -> None:
    """Waiting events hold the position at the oldest one's QEMU time; with nothing waiting the
    stream is read up to the newest QEMU time while events keep coming (libvirtd may hold more:
    a backlog caught up after a stop carries old timestamps), and up to now once quiet."""
    import asyncio

    from exporter.libvirt.inbox import EventInbox

    clock = [1000.0]
    inbox = EventInbox(asyncio.get_running_loop(), lambda item: None, lambda: clock[0], merge_gap=1.0)
    assert inbox.read_through(1000.0) == 1000.0  # nothing ever came: quiet
    inbox.put(("lifecycle", 1, "dom-a", 2, 0), "dom-a")
    assert inbox.read_through(1000.0) == 1000.0  # no QEMU time yet: its arrival
    for ts in (960.0, 960.5):  # a backlog: 40 s old events arriving now
        inbox.put_event(1, "dom-a", "BLOCK_IO_ERROR", *_parts(ts), _error())
    assert inbox.read_through(1000.0) == 1000.0  # the lifecycle item waits first
    await _drained(inbox)
    assert inbox.read_through(1000.2) == 960.5  # events keep coming: read up to the newest
    clock[0] = 1000.3
    inbox.put_event(1, "dom-a", "BLOCK_IO_ERROR", *_parts(961.0), _error())
    assert inbox.read_through(1000.3) == 961.0  # waiting: the oldest waiting one
    await _drained(inbox)
    assert inbox.read_through(1000.7) == 961.0
    assert inbox.read_through(1000.3 + EventInbox.QUIET_S) == 1000.3 + EventInbox.QUIET_S  # quiet
