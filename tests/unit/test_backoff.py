"""The reconnect backoff both sources share (`exporter.runtime.backoff`)."""

from __future__ import annotations

from exporter.runtime.backoff import Backoff


def test_doubles_up_to_the_maximum_with_jitter_and_resets() -> None:
    ranges: list[tuple[float, float]] = []
    b = Backoff(0.25, 2.0, uniform=lambda lo, hi: ranges.append((lo, hi)) or hi)
    delays = [b.next_delay() for _ in range(6)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert ranges[0] == (0.125, 0.25)  # jitter: between half and all of the current step
    b.reset()
    assert b.next_delay() == 0.25


def test_the_jitter_stays_within_half_and_all_of_each_step() -> None:
    b = Backoff(1.0, 8.0)
    for step in (1.0, 2.0, 4.0, 8.0, 8.0):
        assert step / 2 <= b.next_delay() <= step
