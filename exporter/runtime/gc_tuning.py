"""Keeps the cyclic garbage collector from stalling the event loop at fleet scale.

Measured in docs/performance-history.md ("cyclic GC at 1000 VMs"): at 1000 VMs a full
collection walked ~150,000 long-lived objects for 170-340 ms with the event loop stopped, every
~0.5 s while the fleet connected.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from exporter.model.sink import EventSink
from exporter.model.state import VMState

#: How often the fleet's shape is checked by `freeze_long_lived`.
GC_SETTLE_TICK_SECONDS = 1.0
#: Ticks of continuous change after which the full collection is done anyway (a flapping VM).
GC_SETTLE_MAX_TICKS = 30
#: Generation-1 collections between full ones while the fleet changes: never, in practice.
GC_DEFERRED_GEN2_THRESHOLD = 1_000_000
#: Objects promoted to the old generation in a tick above which the heap counts as changing
#: (a 4-disk VM's session is ~130 objects).
GC_SETTLE_PROMOTED = 5000


async def freeze_long_lived(
    fleet_shape: Callable[[], tuple[int, int]],
    departed: Callable[[], int],
    tick: float = GC_SETTLE_TICK_SECONDS,
    max_ticks: int = GC_SETTLE_MAX_TICKS,
) -> None:
    """Keep the sessions' long-lived objects out of the cyclic GC's full collections.

    At 1000 VMs the QMP sessions, watchers and caches are ~150,000 GC-tracked objects; a
    full (generation 2) collection walks all of them: 170-340 ms with the event loop
    stopped, every ~0.5 s while the fleet connects and every ~10-30 s after.  So while the
    fleet changes (start-up, sockets found or lost, sessions coming up or going down, or
    more than ``GC_SETTLE_PROMOTED`` objects promoted to the old generation in a tick)
    full collections are put off (young ones go on) and what survived is frozen every
    tick (`gc.freeze`: out of the collector's reach); once a tick passes without change
    (or after ``max_ticks`` of change), one full collection and a freeze again.  One pause
    per fleet change instead of recurring ones; full collections of what is created after
    the freeze (a small heap) run as usual.

    That collection walks everything, unfrozen first, only when a session ended or a VM
    went away since the last one (``departed``, a count that only grows): the cyclic garbage
    of dead sessions is then freed rather than kept forever, which bounds what a freeze can
    leak to one fleet change.  When none did (start-up, VMs added) it walks only what is
    not frozen: the unfrozen walk at start-up took 143-320 ms at 1000 VMs x 4 disks and
    freed ~20 objects; it fell on the first scrape of an outage the exporter started into
    (docs/performance-history.md).
    """
    gen0, gen1, gen2 = gc.get_threshold()
    shape, changing = fleet_shape(), 1
    departed_at_full = 0  # the count at the last collection over everything (none yet)
    gc.set_threshold(gen0, gen1, GC_DEFERRED_GEN2_THRESHOLD)

    def collect() -> None:
        nonlocal departed_at_full
        gone = departed()
        if gone != departed_at_full:
            departed_at_full = gone
            gc.unfreeze()
        gc.collect()
        gc.freeze()

    try:
        while True:
            await asyncio.sleep(tick)
            now = fleet_shape()
            if changing and changing < max_ticks:
                promoted = len(gc.get_objects(generation=2))  # since the last freeze
                gc.freeze()
                if now == shape and promoted < GC_SETTLE_PROMOTED:
                    changing = 0
                    gc.set_threshold(gen0, gen1, gen2)
                    collect()
                else:
                    changing += 1
            elif changing:  # changing for too long (a flapping VM): collect anyway
                changing = 1
                collect()
            elif now != shape:
                changing = 1
                gc.set_threshold(gen0, gen1, GC_DEFERRED_GEN2_THRESHOLD)
            shape = now
    finally:
        gc.set_threshold(gen0, gen1, gen2)


class Departures(EventSink):
    """Counts sessions that ended and VMs no longer watched: what leaves garbage behind
    (`freeze_long_lived`'s ``departed``)."""

    def __init__(self) -> None:
        self.count = 0

    def on_session_end(self, vm: VMState, now: float, vm_gone: bool) -> None:
        self.count += 1

    def on_removed(self, vm: VMState, now: float) -> None:
        self.count += 1
