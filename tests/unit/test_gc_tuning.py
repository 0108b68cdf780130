"""The GC policy: full collections deferred while the fleet changes, thresholds restored after."""

from __future__ import annotations

import asyncio
import contextlib
import gc

from exporter.gc_tuning import GC_DEFERRED_GEN2_THRESHOLD, freeze_long_lived
from tests.support.waits import wait_for


async def test_defers_full_collections_while_changing_and_restores_them() -> None:
    original = gc.get_threshold()
    shape = [(3, 0)]
    task = asyncio.create_task(freeze_long_lived(lambda: shape[0], tick=0.3, max_ticks=1000))
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
