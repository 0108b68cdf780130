"""exporter.hang.journal: the hang journal's file format, cap and rotation, torn lines, and the
journal fed by the real hang tracking (real files in a temporary directory; the clock is a
variable, as hang tracking takes its time from its caller)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from exporter.hang import journal as journal_mod
from exporter.hang.incidents import HangRecord, Window
from exporter.hang.journal import HangJournal, JournalError, JournalFiles
from exporter.hang.outcome import CompletedHang, HangOutcome
from exporter.hang.tracking import HangTracking
from exporter.model.events import BlockIOError, RunStateChange
from exporter.model.policy import DiskPolicy, PolicyVerdict
from exporter.model.sink import SinkGroup
from exporter.model.state import Disk, VMState

T0 = 1_717_243_200.0
NBD = "nbd+unix:/run/nbd0.sock"


def record(i: int, end: float = T0 + 5, outcome: str = "recovered") -> HangRecord:
    return HangRecord(f"vm{i}", f"u{i}", "virtio-disk0", NBD, end - 5, end, outcome, 10.0, 3, "qmp")


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- the files -----------------------------------------------------------------------------


def test_records_are_one_json_line_each_and_read_back(tmp_path: Path) -> None:
    files = JournalFiles(str(tmp_path / "hangs.jsonl"))
    files.append([record(1), record(2, outcome="timed_out")])
    files.append([record(3)])
    assert [d["vm"] for d in lines(tmp_path / "hangs.jsonl")] == ["vm1", "vm2", "vm3"]
    got = files.read()
    assert got.records == [record(1), record(2, outcome="timed_out"), record(3)] and got.corrupt == 0


def test_rotation_by_size_keeps_the_newest_and_at_most_twice_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "hangs.jsonl"
    line = len(json.dumps(record(0).to_json(), separators=(",", ":"))) + 1
    files = JournalFiles(str(path), max_bytes=10 * line)
    for batch in range(7):
        files.append([record(batch * 5 + k) for k in range(5)])  # 35 records, 5 a batch
        assert path.stat().st_size <= 10 * line
    rotated = Path(str(path) + ".1")
    assert rotated.stat().st_size <= 10 * line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hangs.jsonl", "hangs.jsonl.1"]
    kept = [r.vm for r in files.read().records]
    assert kept == [f"vm{i}" for i in range(35 - len(kept), 35)]  # the newest, in order
    assert len(kept) >= 10


def test_a_torn_last_line_is_cut_counted_and_the_next_record_starts_clean(tmp_path: Path) -> None:
    path = tmp_path / "hangs.jsonl"
    files = JournalFiles(str(path))
    files.append([record(1), record(2)])
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 40])  # SIGKILL in the middle of the second line
    got = files.load(lambda r: True)
    assert [r.vm for r in got.records] == ["vm1"]
    assert got.corrupt == 1 and got.cut == len(whole.splitlines(keepends=True)[1]) - 40
    assert path.read_bytes().endswith(b"\n")
    files.append([record(3)])
    assert [r.vm for r in files.read().records] == ["vm1", "vm3"]


def test_a_file_that_is_only_a_torn_line_loads_empty(tmp_path: Path) -> None:
    path = tmp_path / "hangs.jsonl"
    path.write_bytes(b'{"vm":"half')
    got = JournalFiles(str(path)).load(lambda r: True)
    assert (got.records, got.corrupt, path.read_bytes()) == ([], 1, b"")


def test_lines_that_are_not_records_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "hangs.jsonl"
    good = json.dumps(record(1).to_json())
    path.write_text(
        f"{good}\nnot json\n\n{{}}\n{json.dumps({**record(2).to_json(), 'outcome': 'x'})}\n{good}\n"
    )
    got = JournalFiles(str(path)).load(lambda r: True)
    assert [r.vm for r in got.records] == ["vm1", "vm1"] and got.corrupt == 3


def test_a_journal_whose_directory_is_missing_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="No such file or directory"):
        HangJournal(str(tmp_path / "missing" / "hangs.jsonl"), 1 << 20, Clock(T0))


# --- fed by the hang tracking --------------------------------------------------------------


def vm_on(key: str, name: str, disks: int = 1, timeout_ms: int = 3000) -> VMState:
    policy = DiskPolicy("retry", "retry", 1000, timeout_ms, True)
    vm = VMState.qmp(key)
    vm.name, vm.uuid, vm.up, vm.status = name, f"uuid-{name}", True, "running"
    vm.set_disks(
        {
            f"virtio-disk{j}": Disk(
                f"virtio-disk{j}",
                "",
                f"node{j}",
                f"d{j}",
                f"/machine/peripheral/virtio-disk{j}",
                "virtio-blk",
                policy,
                PolicyVerdict(()),
                backend=NBD,
            )
            for j in range(disks)
        }
    )
    return vm


def tracked(tmp_path: Path, clock: Clock) -> tuple[HangTracking, HangJournal, SinkGroup]:
    hangs = HangTracking(1.0)
    journal = HangJournal(str(tmp_path / "hangs.jsonl"), 1 << 20, clock)
    hangs.on_completed = journal.completed
    return hangs, journal, SinkGroup(hangs, journal)


async def test_an_event_storm_writes_nothing_until_the_hang_completes(tmp_path: Path) -> None:
    clock = Clock(T0)
    hangs, journal, sink = tracked(tmp_path, clock)
    vm = vm_on("/run/a.qmp", "a", timeout_ms=0)
    sink.on_disks(vm, T0)
    path = tmp_path / "hangs.jsonl"
    for k in range(20_000):  # 20,000 failed attempts in 2 s
        sink.on_event(vm, BlockIOError(T0 + k * 1e-4, "virtio-disk0", "write", "retry"))
        if k % 5000 == 0:
            clock.t = T0 + k * 1e-4
            hangs.tick(clock.t)
    await asyncio.sleep(0.05)
    assert path.stat().st_size == 0 and journal.written == 0
    clock.t = T0 + 10
    hangs.tick(clock.t)  # silence: the hang recovered
    await journal.close()
    [doc] = lines(path)
    assert doc["io_error_events"] == 20_000 and doc["outcome"] == "recovered"
    assert (doc["vm"], doc["uuid"], doc["backend"], doc["source"]) == ("a", "uuid-a", NBD, "qmp")
    assert doc["start"] == T0 and doc["retry_timeout_seconds"] == 0.0
    assert journal.written == 1


async def test_a_hang_ended_by_the_vm_going_keeps_the_vms_identity(tmp_path: Path) -> None:
    clock = Clock(T0)
    _hangs, journal, sink = tracked(tmp_path, clock)
    vm = vm_on("/run/b.qmp", "b")
    sink.on_disks(vm, T0)
    sink.on_event(vm, BlockIOError(T0 + 1, "virtio-disk0", "write", "retry"))
    sink.on_event(vm, RunStateChange(T0 + 2, "SHUTDOWN"))
    sink.on_session_end(vm, T0 + 2, True)
    vm.end_session()  # the session forgets name-independent identity: uuid, disks
    sink.on_removed(vm, T0 + 2.5)  # drained here, after which the journal forgets the VM
    await journal.close()
    [doc] = lines(tmp_path / "hangs.jsonl")
    assert (doc["vm"], doc["uuid"], doc["backend"], doc["outcome"]) == ("b", "uuid-b", NBD, "vm_gone")
    assert doc["end"] == T0 + 2


async def test_timed_out_hang_end_is_qemus_report_time(tmp_path: Path) -> None:
    clock = Clock(T0)
    hangs, journal, sink = tracked(tmp_path, clock)
    vm = vm_on("/run/c.qmp", "c")
    sink.on_disks(vm, T0)
    for k in range(3):
        sink.on_event(vm, BlockIOError(T0 + k, "virtio-disk0", "write", "retry"))
    sink.on_event(vm, BlockIOError(T0 + 3.000123, "virtio-disk0", "write", "report"))
    hangs.tick(T0 + 3.5)
    await journal.close()
    [doc] = lines(tmp_path / "hangs.jsonl")
    assert (doc["start"], doc["end"], doc["outcome"], doc["io_error_events"]) == (
        T0,
        T0 + 3.000123,
        "timed_out",
        4,
    )
    assert doc["retry_timeout_seconds"] == 3.0


async def test_4000_hangs_completing_at_once_are_written_in_batches_off_the_loop(tmp_path: Path) -> None:
    clock = Clock(T0)
    hangs, journal, sink = tracked(tmp_path, clock)
    vms = [vm_on(f"/run/vm{i}.qmp", f"vm{i}", disks=4, timeout_ms=0) for i in range(1000)]
    for vm in vms:
        sink.on_disks(vm, T0)
        for dev in vm.disks:
            sink.on_event(vm, BlockIOError(T0 + 1, dev, "write", "retry"))
    clock.t = T0 + 10
    hangs.tick(clock.t)  # the storage is back: 4000 hangs complete in one tick
    assert journal.written == 0  # nothing was written on the loop, in the tick
    await journal.close()
    assert journal.written == 4000 and len(lines(tmp_path / "hangs.jsonl")) == 4000


async def test_a_failing_write_keeps_the_records_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_mod, "RETRY_S", 0.05)
    d = tmp_path / "state"
    d.mkdir()
    clock = Clock(T0)
    journal = HangJournal(str(d / "hangs.jsonl"), 1 << 20, clock)
    os.unlink(d / "hangs.jsonl")
    d.rmdir()  # the journal's directory went away: appends fail
    journal._pending.append(record(1))
    journal._schedule()
    await asyncio.sleep(0.02)
    assert journal.write_errors >= 1 and journal.written == 0
    d.mkdir()
    for _ in range(100):
        if journal.written:
            break
        await asyncio.sleep(0.02)
    assert journal.written == 1 and [x["vm"] for x in lines(d / "hangs.jsonl")] == ["vm1"]


async def test_records_of_the_last_day_are_served_from_memory_older_from_the_files(tmp_path: Path) -> None:
    path = tmp_path / "hangs.jsonl"
    JournalFiles(str(path)).append([record(1, end=T0 - 3 * 86400), record(2, end=T0 - 3600)])
    clock = Clock(T0)
    journal = HangJournal(str(path), 1 << 20, clock)
    assert journal.recent(Window(T0 - 7200, T0)) == [record(2, end=T0 - 3600)]
    assert journal.recent(Window(T0 - 4 * 86400, T0)) is None  # memory does not reach back
    older = await journal.records(Window(T0 - 4 * 86400, T0))
    assert sorted(r.vm for r in older) == ["vm1", "vm2"]
    journal.completed(
        "/run/x.qmp", "virtio-disk0", CompletedHang(T0 + 1, T0 + 2, HangOutcome.RECOVERED, 2), 10.0
    )
    newer = await journal.records(Window(T0 - 4 * 86400, T0 + 5))
    assert sorted(r.vm for r in newer) == ["/run/x.qmp", "vm1", "vm2"]  # unknown disk: its key
    clock.t = T0 + 2 * 86400  # a day later, the hour-old record left memory
    assert journal.recent(Window(T0 - 7200, T0 + 2 * 86400)) is None
    assert journal.incidents_last_day() == []
    await journal.close()
