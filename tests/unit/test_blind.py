"""Blind intervals counted and told to hang tracking (`exporter.runtime.blind`, issue 26)."""

from __future__ import annotations

from exporter.hang.outcome import HangOutcome
from exporter.hang.tracking import HangTracking
from exporter.model.events import BlockIOError
from exporter.model.policy import DiskPolicy, PolicyConfig, verify
from exporter.model.state import Disk, VMState
from exporter.runtime.blind import BlindSpots
from exporter.web.status import build_status

T0 = 1_700_000_000.0


def _vm(key: str = "/run/q/vm1.qmp", source: str = "qmp") -> VMState:
    vm = VMState(key=key, socket=key, source=source)
    p = DiskPolicy("retry", "retry", 1, 0, True)
    vm.set_disks({"d0": Disk("d0", "drive0", "node0", "d0", "q", "virtio-blk", p, verify(p, PolicyConfig()))})
    vm.up = True
    return vm


def test_a_session_gap_counts_for_the_vm_and_its_source_once_it_ends() -> None:
    blind = BlindSpots(loop_min_seconds=5.0)
    qmp, dom = _vm(), _vm("libvirt:u-1", "libvirt")
    for vm in (qmp, dom):
        blind.on_session_start(vm, T0)  # the first session: nothing was missed
        blind.on_session_end(vm, T0 + 10, vm_gone=False)
    assert (qmp.blind_intervals, blind.intervals["qmp"]) == (0, 0)  # counted when it ends
    for vm in (qmp, dom):
        blind.on_session_start(vm, T0 + 13)
    assert (qmp.blind_intervals, qmp.blind_seconds) == (1, 3.0)
    assert (dom.blind_intervals, dom.blind_seconds) == (1, 3.0)
    # libvirt's domains go blind together: the source counts the connection, not each domain.
    assert dict(blind.intervals) == {"event_loop": 0, "qmp": 1, "libvirt": 0}
    blind.connection("qemu:///system", T0 + 10, T0 + 13)
    assert blind.seconds == {"event_loop": 0.0, "qmp": 3.0, "libvirt": 3.0}


def test_nothing_is_missed_from_a_vm_that_is_gone() -> None:
    blind = BlindSpots(loop_min_seconds=5.0)
    a, b, c = _vm("/q/a.qmp"), _vm("/q/b.qmp"), _vm("/q/c.qmp")
    blind.on_session_end(a, T0, vm_gone=True)  # QEMU shut down
    blind.on_session_end(b, T0, vm_gone=False)
    blind.on_connect_failed(b, T0 + 1, "refused")  # ... it was killed: nothing left to see
    blind.on_session_end(c, T0, vm_gone=False)
    blind.on_removed(c, T0 + 1)
    for vm in (a, b, c):
        blind.on_session_start(vm, T0 + 5)
    assert sum(vm.blind_intervals for vm in (a, b, c)) == 0 and sum(blind.intervals.values()) == 0


def test_only_loop_gaps_the_exporter_calls_unhealthy_are_counted() -> None:
    blind = BlindSpots(loop_min_seconds=5.0)
    blind.loop_gap(T0, T0 + 1.6)  # a busy loop in a storm at 1000 VMs
    blind.loop_gap(T0 + 100, T0 + 135)  # SIGSTOP 35 s
    assert blind.intervals["event_loop"] == 1 and blind.seconds["event_loop"] == 35.0
    (metric_intervals, metric_seconds) = blind.collect()
    assert {s.labels["source"]: s.value for s in metric_intervals.samples} == {
        "event_loop": 1,
        "qmp": 0,
        "libvirt": 0,
    }
    assert metric_seconds.samples[0].name == "qemu_exporter_blind_seconds_total"


def test_hang_tracking_takes_a_stall_it_is_told_of_for_no_silence() -> None:
    """The first tick after a 35 s stop runs before the heartbeat: told of the gap going on
    (`HangTracking.loop_blind`), it keeps the hang open, and the errors after the stop
    continue it.  Without the gap the same tick ends it (recovered) and the next error starts
    a second hang."""
    for told in (True, False):
        hangs = HangTracking(margin_s=1.0)
        vm = _vm()
        hangs.on_disks(vm, T0 - 10)
        for i in range(1000):  # an outage: an error every millisecond, until the stop
            hangs.on_event(vm, BlockIOError(T0 + i / 1000, "d0", "write", "retry"))
        hangs.loop_blind = (lambda: (T0 + 1.0, T0 + 36.0)) if told else None
        hangs.tick(T0 + 36.0)
        hangs.on_event(vm, BlockIOError(T0 + 36.001, "d0", "write", "retry"))  # still failing
        hangs.tick(T0 + 36.002)
        tracker = hangs.trackers[vm.key]["d0"]
        assert tracker.hanging
        assert (tracker.hangs_total[HangOutcome.RECOVERED], tracker.hang_start) == (
            (0, T0) if told else (1, T0 + 36.001)
        )


def test_the_status_shows_blind_intervals_latest_first() -> None:
    blind = BlindSpots(loop_min_seconds=5.0)
    vm = _vm()
    blind.loop_gap(T0, T0 + 35)
    blind.on_session_end(vm, T0 + 40, vm_gone=False)
    blind.on_session_start(vm, T0 + 42)
    hangs = HangTracking(margin_s=1.0)
    hangs.on_disks(vm, T0)
    status = build_status([vm], hangs, PolicyConfig(), T0 + 50, blind=blind)
    assert status["schema"] == 1
    assert (status["summary"]["blind_intervals"], status["summary"]["blind_seconds"]) == (2, 37.0)
    assert [(b["source"], b["name"], b["seconds"]) for b in status["blind"]["recent"]] == [
        ("qmp", "vm1", 2.0),
        ("event_loop", "", 35.0),
    ]
    assert status["blind"]["by_source"]["event_loop"] == {"intervals": 1, "seconds": 35.0}
    assert (status["vms"][0]["blind_intervals"], status["vms"][0]["blind_seconds"]) == (1, 2.0)


def test_the_page_says_events_may_have_been_missed() -> None:
    from exporter.web.status_page import render

    blind = BlindSpots(loop_min_seconds=5.0)
    hangs = HangTracking(margin_s=1.0)
    quiet = render(build_status([], hangs, PolicyConfig(), T0, blind=blind))
    assert 'id="blind"' not in quiet and "blind interval" not in quiet
    blind.connection("qemu+unix:///system?socket=/x<y>", T0, T0 + 4)
    page = render(build_status([], hangs, PolicyConfig(), T0 + 5, blind=blind))
    assert '<section id="blind">' in page and "1 blind interval, 4.0 s" in page
    assert '<tr data-source="libvirt"><td>the libvirt connection was down</td>' in page
    assert "socket=/x&lt;y&gt;" in page  # escaped like every value from outside
