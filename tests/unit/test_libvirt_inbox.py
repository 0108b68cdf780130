"""The hand-over of libvirt's events to the event loop (`EventInbox`) as a stream position:
events waiting in it are not handled yet, so the time they cover is not silence."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from exporter.libvirt_watch import EventInbox


async def test_waiting_events_hold_the_stream_position_back() -> None:
    loop = asyncio.get_running_loop()
    clock = [100.0]
    handled: list[tuple[Any, ...]] = []
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
    await asyncio.sleep(0)  # one turn: one batch handled
    assert len(handled) == EventInbox.BATCH
    assert inbox.read_through(105.0) == 101.0 + EventInbox.BATCH / 1000  # the next one waiting
    await asyncio.sleep(0)
    assert len(handled) == EventInbox.BATCH + 10
    assert inbox.read_through(105.0) == 105.0
    assert [item[1] for item in handled] == list(range(EventInbox.BATCH + 10))  # in order
