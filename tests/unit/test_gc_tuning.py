"""The GC policy: full collections deferred while the fleet changes, thresholds restored after."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

from exporter.runtime.gc_tuning import GC_DEFERRED_GEN2_THRESHOLD, freeze_long_lived
from tests.support.waits import wait_for


async def test_defers_full_collections_while_changing_and_restores_them() -> None:
    original = gc.get_threshold()
    shape = [(3, 0)]
    task = asyncio.create_task(freeze_long_lived(lambda: shape[0], lambda: 0, tick=0.3, max_ticks=1000))
    try:

        async def deferred() -> bool:
            return gc.get_threshold()[2] == GC_DEFERRED_GEN2_THRESHOLD

        async def restored() -> bool:
            return gc.get_threshold() == original

        await asyncio.sleep(0)  # let the task apply its start-up setting
        assert await deferred(), "full collections deferred at start-up"
        await wait_for(restored, 2, "thresholds restored once the fleet settles")
        shape[0] = (3, 3)  # sessions came up: the heap changes again
        await wait_for(deferred, 2, "deferred again on change")
        await wait_for(restored, 2, "restored again")
        shape[0] = (4, 3)
        await wait_for(deferred, 2, "deferred on a new socket")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.unfreeze()
    assert gc.get_threshold() == original  # cancelling (shutdown) restores them too


class _Cycle:
    """Cyclic garbage once dropped: only a full collection frees it."""

    def __init__(self) -> None:
        self.me = self


async def test_frozen_objects_are_walked_again_only_after_a_departure() -> None:
    """The settle collection unfreezes (and frees the cyclic garbage of what went away) only
    when a session ended or a VM was removed since the last one; otherwise it leaves the frozen
    heap alone, which is what makes it cheap at start-up."""
    original = gc.get_threshold()
    shape, gone = [(3, 0)], [0]
    obj = _Cycle()
    ref = weakref.ref(obj)
    task = asyncio.create_task(freeze_long_lived(lambda: shape[0], lambda: gone[0], tick=0.2, max_ticks=1000))
    try:

        async def deferred() -> bool:
            return gc.get_threshold()[2] == GC_DEFERRED_GEN2_THRESHOLD

        async def restored() -> bool:
            return gc.get_threshold() == original

        await wait_for(deferred, 2, "deferred at start-up")
        await wait_for(restored, 5, "the start-up settle")
        assert not any(o is obj for o in gc.get_objects()), "frozen while the fleet changed"
        del obj
        gc.collect()
        assert ref() is not None, "frozen cyclic garbage is out of the collector's reach"

        shape[0] = (3, 3)  # sessions came up: a change, but nothing went away
        await wait_for(deferred, 2, "deferred on change")
        await wait_for(restored, 2, "settled")
        assert ref() is not None, "no departure: the settle walks only what is not frozen"

        gone[0] = 1  # a session ended
        shape[0] = (3, 2)
        await wait_for(deferred, 2, "deferred on change")
        await wait_for(restored, 2, "settled")
        assert ref() is None, "after a departure the settle frees the frozen garbage"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.unfreeze()
