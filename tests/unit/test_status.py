"""The status snapshot (`exporter.web.status`) and its page (`exporter.web.status_page`), from the real
model objects fed with typed events: no sockets, no clock of their own."""

from __future__ import annotations

import html
import json
import re
from dataclasses import replace
from pathlib import Path

from exporter.hang.tracking import RECENT_PER_DISK, RECENT_WINDOW_S, HangTracking
from exporter.model.events import BlockIOError
from exporter.model.policy import DiskPolicy, PolicyConfig, Rule, verify
from exporter.model.state import Disk, VMState
from exporter.web.status import RULE_FIXES, build_status, rule_fix
from exporter.web.status_page import render, seconds_text

EVIL = "<script>alert('x')</script>&\"vm\""
T0 = 1_700_000_000.0


def disk(
    device: str, werror: str = "retry", timeout_ms: int = 10_000, policy: PolicyConfig | None = None
) -> Disk:
    p = DiskPolicy(werror, "retry", 1000, timeout_ms, True)
    return Disk(device, "", f"node-{device}", device, f"/machine/peripheral/{device}", "virtio-blk", p,
                verify(p, policy or PolicyConfig()))  # fmt: skip


def vm(name: str, *disks: Disk) -> VMState:
    v = VMState.qmp(f"/run/{name[:8].replace('/', '_')}-{len(name)}.qmp")
    v.name, v.up, v.status = name, True, "running"
    v.set_disks({d.device: d for d in disks})
    return v


def test_every_rule_says_what_to_change() -> None:
    assert set(RULE_FIXES) == set(Rule)
    assert "at most 60 s" in rule_fix(Rule.TIMEOUT_ABOVE_MAX, PolicyConfig(max_timeout_seconds=60))
    for rule in Rule:
        text = rule_fix(rule, PolicyConfig())
        assert text.endswith(".") and text.count(". ") == 0, text  # one sentence


def test_hanging_failing_violating_down_and_recent_are_listed_and_escaped() -> None:
    hangs = HangTracking(margin_s=1.0)
    a = vm(EVIL, disk("virtio-disk0"), disk("<b>d</b>", werror="report"))
    b = vm("forever", disk("virtio-disk0", timeout_ms=0))
    down = VMState.qmp("/run/gone.qmp")
    down.last_connect_error = "refused"
    down.connect_errors["refused"] += 3
    for v in (a, b):
        hangs.on_disks(v, T0)
    for i in range(1, 6):  # failed attempts every second: hanging for 4.5 s at T0 + 5.5
        hangs.on_event(a, BlockIOError(T0 + i, "virtio-disk0", "write", "retry"))
        hangs.on_event(b, BlockIOError(T0 + i, "virtio-disk0", "write", "retry"))
    st = build_status([a, b, down], hangs, PolicyConfig(), T0 + 5.5, [])
    json.dumps(st)  # plain data
    h = {x["vm"]: x for x in st["hanging"]}
    assert h[EVIL]["fraction"] == 0.45 and h[EVIL]["deadline"] == T0 + 11
    assert h["forever"]["fraction"] is None and h["forever"]["retry_timeout_seconds"] == 0
    assert st["hanging"][0]["vm"] == EVIL  # closest to its timeout first
    assert [(v["vm"], v["device"]) for v in st["violations"]] == [(EVIL, "<b>d</b>")]
    assert st["down"] == [
        {
            "vm": "gone",
            "source": "qmp",
            "socket": "/run/gone.qmp",
            "reason": "refused",
            "connect_errors": {"refused": 3},
        }
    ]
    assert st["summary"]["disks"] == 3 and st["summary"]["disks_compliant"] == 2

    page = render(st)
    assert EVIL not in page and "<b>d</b>" not in page
    assert html.escape(EVIL) in page and html.escape("<b>d</b>") in page
    assert page.count("<script>") == 1
    assert "never times out" in page and "10.0 s timeout, 5.5 s left" in page
    assert re.search(r"width:45\.0%", page)

    # Timeout reached: failing since the report, and the hang is a recent "timed_out".
    for i in range(6, 11):
        hangs.on_event(a, BlockIOError(T0 + i, "virtio-disk0", "write", "retry"))
    hangs.on_event(a, BlockIOError(T0 + 11, "virtio-disk0", "write", "report"))
    hangs.tick(T0 + 11.5)
    st = build_status([a, b, down], hangs, PolicyConfig(), T0 + 12, [])
    assert [(f["vm"], f["since"]) for f in st["failing"]] == [(EVIL, T0 + 11)]
    # "forever" got no further error since T0 + 5: recovered (newest last here, by its end).
    assert [(r["vm"], r["outcome"], r["duration_seconds"]) for r in st["recent_hangs"]] == [
        (EVIL, "timed_out", 10.0),
        ("forever", "recovered", 5.0),
    ]
    assert html.escape(EVIL) in render(st) and EVIL not in render(st)


def test_recent_hangs_are_bounded_per_disk_and_forgotten_after_the_window() -> None:
    hangs = HangTracking(margin_s=0.5)
    v = vm("flappy", disk("virtio-disk0"))
    hangs.on_disks(v, T0)
    t = T0
    for _ in range(RECENT_PER_DISK + 5):
        t += 10
        hangs.on_event(v, BlockIOError(t, "virtio-disk0", "write", "retry"))
        hangs.tick(t + 5)  # silence: recovered
    ring = hangs.recent[(v.key, "virtio-disk0")]
    assert len(ring) == RECENT_PER_DISK and all(r.hang.outcome == "recovered" for r in ring)
    assert ring[-1].hang.start == t and ring[-1].vm == "flappy"
    st = build_status([v], hangs, PolicyConfig(), t + 6, [])
    assert len(st["recent_hangs"]) == RECENT_PER_DISK
    assert st["recent_hangs"][0]["start"] == t  # newest first
    hangs.tick(t + RECENT_WINDOW_S + 10)
    assert hangs.recent == {}


def test_recent_hang_of_a_removed_vm_keeps_its_name() -> None:
    hangs = HangTracking(margin_s=1.0)
    v = vm("leaving", disk("virtio-disk0"))
    hangs.on_disks(v, T0)
    hangs.on_event(v, BlockIOError(T0 + 1, "virtio-disk0", "write", "retry"))
    hangs.on_removed(v, T0 + 3)
    st = build_status([], hangs, PolicyConfig(), T0 + 4, [])
    assert [(r["vm"], r["outcome"]) for r in st["recent_hangs"]] == [("leaving", "vm_gone")]


def test_recent_hangs_survive_a_restart_through_the_state_file(tmp_path: Path) -> None:
    """The status page's history is in the state file: a restarted exporter lists the hangs
    that ended before it, with their VM, device, times and outcome; what is not a recent hang
    in the file is left out, not fatal."""
    state = str(tmp_path / "hangs.json")
    hangs = HangTracking(margin_s=1.0, state_file=state)
    v = vm("flappy", disk("virtio-disk0"), disk("virtio-disk1"))
    hangs.on_disks(v, T0)
    hangs.on_event(v, BlockIOError(T0 + 1, "virtio-disk0", "write", "retry"))
    hangs.tick(T0 + 5)  # silence: recovered
    hangs.on_event(v, BlockIOError(T0 + 10, "virtio-disk1", "write", "retry"))
    hangs.on_event(v, BlockIOError(T0 + 11, "virtio-disk1", "write", "report"))  # timed out
    hangs.tick(T0 + 12)
    before = build_status([v], hangs, PolicyConfig(), T0 + 13, [])["recent_hangs"]
    assert [(r["device"], r["outcome"]) for r in before] == [
        ("virtio-disk1", "timed_out"),
        ("virtio-disk0", "recovered"),
    ]

    restarted = HangTracking(margin_s=1.0, state_file=state)
    assert build_status([], restarted, PolicyConfig(), T0 + 13, [])["recent_hangs"] == before

    doc = json.loads(Path(state).read_text())
    doc["recent"] += [["k", "d", "vm"], ["k", "d", "vm", 1.0, 2.0, "exploded"], ["k", "d", 7, 1.0, 2.0, "recovered"],
                      ["k", "d", "vm", "nan", 2.0, "recovered"], ["k", "d", "vm", 3.0, 2.0, "recovered"], "x"]  # fmt: skip
    Path(state).write_text(json.dumps(doc))
    again = HangTracking(margin_s=1.0, state_file=state)
    assert build_status([], again, PolicyConfig(), T0 + 13, [])["recent_hangs"] == before
    again.tick(T0 + 12 + RECENT_WINDOW_S + 1)  # an hour later: forgotten, as without a restart
    assert again.recent == {}


def test_seconds_text() -> None:
    assert [seconds_text(x) for x in (None, 0.04, 59.94, 60, 3599, 3600 * 25 + 61)] == [
        "—", "0.0 s", "59.9 s", "1 m 00 s", "59 m 59 s", "25 h 01 m"
    ]  # fmt: skip


def test_problems_are_grouped_by_storage_backend() -> None:
    """'Is it the storage?': hanging and failing disks counted per backend, worst first, with
    the VMs they take down; healthy backends are not listed."""
    import dataclasses

    def on(d: Disk, backend: str) -> Disk:
        return dataclasses.replace(d, backend=backend)

    hangs = HangTracking(margin_s=1.0)
    a = vm("a", on(disk("virtio-disk0"), "nbd://san-a:10809"), on(disk("virtio-disk1"), "nfs://filer/b"))
    b = vm("b", on(disk("virtio-disk0"), "nbd://san-a:10809"))
    c = vm("c", on(disk("virtio-disk0"), "nfs://filer/b"))
    for v in (a, b, c):
        hangs.on_disks(v, T0)
    for i in range(1, 4):
        for v in (a, b):
            hangs.on_event(v, BlockIOError(T0 + i, "virtio-disk0", "write", "retry"))
    st = build_status([a, b, c], hangs, PolicyConfig(), T0 + 3.5, [])
    assert st["backends"] == [
        {"backend": "nbd://san-a:10809", "disks": 2, "hanging": 2, "failing": 0, "vms_affected": 2}
    ]
    assert {h["backend"] for h in st["hanging"]} == {"nbd://san-a:10809"}
    page = render(st)
    assert page.index('id="backends"') < page.index('id="hanging"')
    assert 'data-backend="nbd://san-a:10809"' in page and "nfs://filer/b" not in page.split('id="hanging"')[0]


def test_incidents_of_the_last_day_are_folded_and_escaped(tmp_path: Path) -> None:
    """With the hang journal, the page lists the storage incidents of the last 24 h in a
    ``<details>``, the guests that saw IO errors folded again; names and backends escaped."""
    from exporter.hang.journal import HangJournal

    evil_backend = "nbd://<i>evil</i>:10809"
    a = vm(EVIL, disk("virtio-disk0"))
    b = vm("calm", disk("virtio-disk0", timeout_ms=60_000))
    for v in (a, b):
        v.set_disks({d: replace(x, backend=evil_backend) for d, x in v.disks.items()})
    clock = [T0]
    journal = HangJournal(str(tmp_path / "hangs.jsonl"), 1 << 20, lambda: clock[0])
    hangs = HangTracking(margin_s=1.0)
    hangs.on_completed = journal.completed
    for v in (a, b):
        hangs.on_disks(v, T0)
        journal.on_disks(v, T0)
    for i in range(10):
        for v in (a, b):
            hangs.on_event(v, BlockIOError(T0 + i, "virtio-disk0", "write", "retry"))
    hangs.on_event(a, BlockIOError(T0 + 10, "virtio-disk0", "write", "report"))
    clock[0] = T0 + 20
    hangs.tick(clock[0])  # a timed out at 10 s, b recovered
    incidents = journal.incidents_last_day()
    st = build_status([a, b], hangs, PolicyConfig(), clock[0], [], incidents=incidents)
    assert [(i["backend"], i["disks"], i["recovered"], i["timed_out"]) for i in st["incidents"]] == [
        (evil_backend, 2, 1, 1)
    ]
    assert st["incidents"][0]["guests_saw_errors"][0]["at"] == T0 + 10
    page = render(st)
    section = page[page.index('<section id="incidents">') : page.index('<section id="recent">')]
    assert "(1)</span>" in section and '<details id="incidents-24h">' in section
    assert "1 incident: 2 disks hung, 1 guest saw IO errors" in section
    assert html.escape(evil_backend) in section and evil_backend not in section
    assert html.escape(EVIL) in section and EVIL not in page
    assert re.search(
        r'<details id="incident-\d+-[0-9a-f]{8}"><summary class="bad">1 guest</summary>', section
    )
    # Without the journal, no such section.
    assert '<section id="incidents">' not in render(build_status([a, b], hangs, PolicyConfig(), clock[0], []))
