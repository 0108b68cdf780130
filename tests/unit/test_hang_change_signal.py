"""`HangTracking.on_change` (what the alert push listens to) when many hangs start at once.

A host's storage failing makes every disk start hanging within moments.  `on_change` walks
every tracker, so one call per hang start made that quadratic (4000 disks: the event loop held
for 17 s).  Hangs that start while a call is pending share it; the push still learns of each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from exporter.hang.machine import DiskHangTracker
from exporter.hang.tracking import CHANGE_COALESCE_S, HangTracking
from exporter.model.events import BlockIOError
from exporter.model.policy import DiskPolicy, PolicyVerdict
from exporter.model.state import Disk, VMState

T0 = 1_700_000_000.0


def fleet(n: int, disks: int) -> list[VMState]:
    policy = DiskPolicy("retry", "retry", 1000, 60_000, True)
    vms = []
    for i in range(n):
        vm = VMState.qmp(f"/run/vm{i}.qmp")
        vm.name, vm.up, vm.status = f"vm{i}", True, "running"
        vm.set_disks(
            {
                f"d{j}": Disk(
                    f"d{j}", "", f"n{j}", f"d{j}", f"/machine/d{j}", "virtio-blk", policy, PolicyVerdict(())
                )
                for j in range(disks)
            }
        )
        vms.append(vm)
    return vms


def hanging(trackers: Mapping[str, Mapping[str, DiskHangTracker]]) -> int:
    return sum(t.hanging for devs in trackers.values() for t in devs.values())


async def test_hangs_starting_together_share_one_change() -> None:
    vms = fleet(50, 4)
    hangs = HangTracking(2.0)
    for vm in vms:
        hangs.on_disks(vm, T0)
    seen: list[int] = []
    hangs.on_change = lambda trackers: seen.append(hanging(trackers))
    for vm in vms:  # the whole host's storage fails: every disk's first error
        for dev in vm.disks:
            hangs.on_event(vm, BlockIOError(T0 + 1, dev, "write", "retry"))
        await asyncio.sleep(0)  # the readers deliver VM by VM, over many turns of the loop
    await asyncio.sleep(2 * CHANGE_COALESCE_S)
    assert seen, "the push never heard of the hangs"
    assert seen[-1] == 200  # it learns of every one
    assert len(seen) <= 2  # the first at once, the rest together


async def test_a_lone_hang_is_told_at_once_and_later_ones_within_the_window() -> None:
    vm = fleet(1, 2)[0]
    hangs = HangTracking(2.0)
    hangs.on_disks(vm, T0)
    seen: list[int] = []
    hangs.on_change = lambda trackers: seen.append(hanging(trackers))
    hangs.on_event(vm, BlockIOError(T0 + 1, "d0", "write", "retry"))
    await asyncio.sleep(0)
    assert seen == [1]  # no waiting after a quiet spell
    hangs.on_event(vm, BlockIOError(T0 + 1, "d1", "write", "retry"))
    await asyncio.sleep(0)
    assert seen == [1]  # coalesced: within the window of the previous call
    await asyncio.sleep(2 * CHANGE_COALESCE_S)
    assert seen == [1, 2]


def test_without_an_event_loop_each_start_is_told_at_once() -> None:
    vm = fleet(1, 2)[0]
    hangs = HangTracking(2.0)
    hangs.on_disks(vm, T0)
    seen: list[int] = []
    hangs.on_change = lambda trackers: seen.append(hanging(trackers))
    for dev in vm.disks:
        hangs.on_event(vm, BlockIOError(T0 + 1, dev, "write", "retry"))
    assert seen == [1, 2]
