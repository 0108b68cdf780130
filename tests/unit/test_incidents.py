"""exporter.hang.incidents: hang records, report windows and hangs grouped into storage
incidents.  Pure: examples from the issue, and properties over random records (hypothesis)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.hang.incidents import (
    DEFAULT_WINDOW_S,
    INCIDENT_GAP_S,
    HangRecord,
    Window,
    disk_key,
    group_incidents,
    incidents_json,
    parse_time,
    parse_window,
    select,
)

T0 = 1_717_243_200.0  # 2024-06-01T12:00:00Z
NBD = "nbd://10.0.0.5:10809"


def rec(
    vm: str,
    start: float,
    end: float,
    outcome: str = "recovered",
    device: str = "virtio-disk0",
    backend: str = NBD,
    host: str | None = None,
) -> HangRecord:
    return HangRecord(
        vm=vm,
        uuid=f"uuid-{vm}",
        device=device,
        backend=backend,
        start=T0 + start,
        end=T0 + end,
        outcome=outcome,
        retry_timeout_seconds=10.0,
        io_error_events=7,
        source="qmp",
        host=host,
    )


# --- records -----------------------------------------------------------------------------


def test_record_json_has_the_issues_fields_in_order_and_round_trips() -> None:
    r = rec("web-1", 0.0, 12.5, "timed_out")
    doc = r.to_json()
    assert list(doc) == [
        "vm",
        "uuid",
        "device",
        "backend",
        "start",
        "end",
        "duration_seconds",
        "outcome",
        "retry_timeout_seconds",
        "io_error_events",
        "source",
    ]
    assert doc["duration_seconds"] == 12.5
    assert HangRecord.from_json(json.loads(json.dumps(doc))) == r
    assert HangRecord.from_json(doc, host="h1").to_json()["host"] == "h1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"start": "x"}, "start is not a finite number"),
        ({"end": float("inf")}, "end is not a finite number"),
        ({"end": T0 - 1}, "end is before start"),
        ({"outcome": "fine"}, "outcome 'fine' is not one of"),
        ({"io_error_events": -1}, "io_error_events is not a count"),
        ({"io_error_events": True}, "io_error_events is not a count"),
        ({"retry_timeout_seconds": -1}, "retry_timeout_seconds is negative"),
        ({"vm": ""}, "vm is not a non-empty string"),
        ({"uuid": None}, "uuid is not a string"),
        ({"backend": 3}, "backend is not a non-empty string"),
    ],
)
def test_record_from_json_names_what_is_wrong(change: dict[str, object], message: str) -> None:
    doc = {**rec("a", 0, 1).to_json(), **change}
    with pytest.raises(ValueError, match=message):
        HangRecord.from_json(doc)


def test_record_from_json_rejects_what_is_not_an_object() -> None:
    for doc in ([], "x", 3, None):
        with pytest.raises(ValueError, match="not a JSON object"):
            HangRecord.from_json(doc)


# --- windows -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1717243200", T0),
        ("1717243200.25", T0 + 0.25),
        ("90s", T0 + 1000 - 90),
        ("2h", T0 + 1000 - 7200),
        ("1h30m", T0 + 1000 - 5400),
        ("7d", T0 + 1000 - 7 * 86400),
        ("1w", T0 + 1000 - 604800),
        ("500ms", T0 + 1000 - 0.5),
        ("0s", T0 + 1000),
        ("2024-06-01T12:00:00Z", T0),
        ("2024-06-01T14:00:00+02:00", T0),
        (" 2h ", T0 + 1000 - 7200),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time("since", text, T0 + 1000) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("yesterday", "since: 'yesterday' is neither a Unix time"),
        ("-5m", "is neither"),
        ("2h ago", "is neither"),
        ("5x", "is neither"),
        ("", "is neither"),
        ("2024-06-01T12:00:00", "has no time zone"),
        ("1" * 400, "out of range"),
    ],
)
def test_parse_time_says_what_is_accepted(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_time("since", text, T0)


def test_parse_window_defaults_to_the_last_day_and_refuses_an_inverted_one() -> None:
    assert parse_window(None, None, T0) == Window(T0 - DEFAULT_WINDOW_S, T0)
    assert parse_window("2h", None, T0) == Window(T0 - 7200, T0)
    assert parse_window("3h", "1h", T0) == Window(T0 - 10800, T0 - 3600)
    with pytest.raises(ValueError, match=r"since .* is after until"):
        parse_window("1h", "3h", T0)
    with pytest.raises(ValueError, match="until: 'soon'"):
        parse_window(None, "soon", T0)


def test_select_keeps_overlapping_hangs_newest_first_and_filters() -> None:
    records = [
        rec("before", -100, -50),
        rec("straddles-since", -20, 5, "timed_out"),
        rec("inside", 10, 20),
        rec("straddles-until", 90, 200, backend="rbd://c/vms"),
        rec("after", 101, 110),
    ]
    w = Window(T0, T0 + 100)
    assert [r.vm for r in select(records, w)] == ["straddles-until", "inside", "straddles-since"]
    assert [r.vm for r in select(records, w, backend=NBD)] == ["inside", "straddles-since"]
    assert [r.vm for r in select(records, w, outcome="timed_out")] == ["straddles-since"]
    assert select(records, w, backend="nope") == []


# --- incidents: the issue's example ------------------------------------------------------


def test_one_outage_two_disks_one_recovered_one_timed_out() -> None:
    """Two VMs on one NBD server, one retry_timeout shorter than the outage: one incident,
    the timed-out guest in guests_saw_errors at its timeout."""
    hangs = [rec("short", 0.0, 3.0, "timed_out"), rec("long", 0.1, 8.0, "recovered")]
    [incident] = incidents_json(hangs)
    assert incident == {
        "backend": NBD,
        "start": T0,
        "end": T0 + 8.0,
        "duration_seconds": 8.0,
        "disks": 2,
        "vms": 2,
        "hangs": 2,
        "recovered": 1,
        "timed_out": 1,
        "vm_gone": 0,
        "guests_saw_errors": [
            {"vm": "short", "device": "virtio-disk0", "at": T0 + 3.0, "uuid": "uuid-short"}
        ],
    }


def test_gap_joins_a_flapping_backend_and_splits_separate_outages() -> None:
    hangs = [
        rec("a", 0, 10),
        rec("b", 10 + INCIDENT_GAP_S, 80),  # exactly the gap after: same incident
        rec("a", 80 + INCIDENT_GAP_S + 0.001, 200),  # just beyond: a new one
    ]
    incidents = group_incidents(hangs)
    assert [(i.start, i.end, len(i.hangs)) for i in incidents] == [
        (T0 + 80 + INCIDENT_GAP_S + 0.001, T0 + 200, 1),
        (T0, T0 + 80, 2),
    ]


def test_backends_never_share_an_incident() -> None:
    hangs = [rec("a", 0, 10), rec("b", 1, 9, backend="rbd://c/vms")]
    assert sorted(i.backend for i in group_incidents(hangs)) == sorted([NBD, "rbd://c/vms"])


def test_a_disk_counts_once_by_its_worst_outcome_first_timeout_is_at() -> None:
    hangs = [
        rec("flap", 0, 5, "recovered"),
        rec("flap", 6, 9, "timed_out"),
        rec("flap", 12, 15, "timed_out"),
        rec("gone", 0, 4, "vm_gone"),
        rec("gone", 0, 2, "recovered", device="virtio-disk1"),
    ]
    [i] = group_incidents(hangs)
    doc = i.to_json()
    assert (doc["disks"], doc["vms"], doc["hangs"]) == (3, 2, 5)
    assert (doc["recovered"], doc["timed_out"], doc["vm_gone"]) == (1, 1, 1)
    assert [(g["vm"], g["at"]) for g in doc["guests_saw_errors"]] == [("flap", T0 + 9)]


def test_hosts_keep_same_named_vms_apart() -> None:
    hangs = [rec("web", 0, 3, "timed_out", host="h1"), rec("web", 0, 3, "timed_out", host="h2")]
    doc = group_incidents(hangs)[0].to_json()
    assert (doc["disks"], doc["vms"]) == (2, 2)
    assert [g["host"] for g in doc["guests_saw_errors"]] == ["h1", "h2"]


def test_no_records_no_incidents() -> None:
    assert group_incidents([]) == []


# --- incidents: properties ---------------------------------------------------------------

records = st.lists(
    st.builds(
        lambda vm, dev, backend, start, length, outcome, host: rec(
            f"vm{vm}", start, start + length, outcome, f"disk{dev}", backend, host
        ),
        st.integers(0, 5),
        st.integers(0, 2),
        st.sampled_from([NBD, "rbd://c/vms", "nfs://filer1/export"]),
        st.floats(0, 2000, allow_nan=False),
        st.one_of(st.just(0.0), st.floats(0, 300, allow_nan=False)),
        st.sampled_from(["recovered", "timed_out", "vm_gone"]),
        st.sampled_from([None, "h1", "h2"]),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(records, st.sampled_from([0.0, 1.0, INCIDENT_GAP_S, 600.0]), st.randoms())
def test_incident_invariants(hangs: list[HangRecord], gap: float, rnd: random.Random) -> None:
    incidents = group_incidents(hangs, gap)
    # Every hang in exactly one incident, of its own backend.
    placed = [r for i in incidents for r in i.hangs]
    assert sorted(map(repr, placed)) == sorted(map(repr, hangs))
    assert all(r.backend == i.backend for i in incidents for r in i.hangs)
    # The order of the input does not matter.
    shuffled = list(hangs)
    rnd.shuffle(shuffled)
    assert [i.to_json() for i in group_incidents(shuffled, gap)] == [i.to_json() for i in incidents]
    # Newest first.
    assert [i.start for i in incidents] == sorted((i.start for i in incidents), reverse=True)
    for i in incidents:
        assert i.start == min(r.start for r in i.hangs) and i.end == max(r.end for r in i.hangs)
        # Chained: in start order, each hang starts within the gap of those before it.
        ordered = sorted(i.hangs, key=lambda r: r.start)
        reach = ordered[0].end
        for r in ordered[1:]:
            assert r.start <= reach + gap
            reach = max(reach, r.end)
        doc = i.to_json()
        disks = {disk_key(r) for r in i.hangs}
        assert doc["disks"] == len(disks) == doc["recovered"] + doc["timed_out"] + doc["vm_gone"]
        assert doc["vms"] == len({(r.host or "", r.vm) for r in i.hangs}) <= doc["disks"]
        assert doc["hangs"] == len(i.hangs)
        timed_out = {disk_key(r) for r in i.hangs if r.outcome == "timed_out"}
        saw = doc["guests_saw_errors"]
        assert len(saw) == len(timed_out) == doc["timed_out"]
        for g in saw:
            k = (g.get("host", ""), g["vm"], g["device"])
            assert k in timed_out
            assert g["at"] == min(r.end for r in i.hangs if disk_key(r) == k and r.outcome == "timed_out")
    # Incidents of one backend are further apart than the gap.
    by_backend: dict[str, list[tuple[float, float]]] = {}
    for i in incidents:
        by_backend.setdefault(i.backend, []).append((i.start, i.end))
    for spans in by_backend.values():
        spans.sort()
        for (_s0, e0), (s1, _e1) in itertools.pairwise(spans):
            assert s1 > e0 + gap


@settings(max_examples=200, deadline=None)
@given(records, st.floats(-100, 2500), st.floats(0, 2500))
def test_select_is_exactly_the_overlapping_hangs(hangs: list[HangRecord], lo: float, span: float) -> None:
    w = Window(T0 + lo, T0 + lo + span)
    got = select(hangs, w)
    assert sorted(map(repr, got)) == sorted(repr(r) for r in hangs if r.end >= w.since and r.start <= w.until)
    assert [r.start for r in got] == sorted((r.start for r in got), reverse=True)
