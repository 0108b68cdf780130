"""Scrapes first: keeps /metrics answering while a QMP event storm saturates the event loop.

A QMP reader handles every complete line already buffered before it gives the loop back
(`StreamReader.readline` returns a buffered line without suspending), so when 1000 VMs all
send events faster than they can be handled, one turn of the loop takes seconds, and a scrape,
which needs several turns (read the request, render, write 8 MB), took more than 30 s.  For a
short while after a scrape starts, readers step aside after each line instead: turns get short,
the scrape goes through, and events wait in the socket buffers (nothing is lost, they are only
handled a moment later).

Readers yield from the start of a scrape until its response is written, and for at most
`SCRAPE_WINDOW_SECONDS`: a response whose connection dropped before it was written never
reports its end, and must not slow every reader for good.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: How long after a scrape starts readers keep yielding: a scrape of 1000 VMs takes well under
#: a second when they do.
SCRAPE_WINDOW_SECONDS = 2.0


class ScrapeFirst:
    """Shared by the HTTP handler (which marks scrapes) and the QMP readers (which yield)."""

    __slots__ = ("_clock", "_open", "_until")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._open = 0
        self._until = 0.0

    def scrape_started(self) -> None:
        self._open += 1
        self._until = self._clock() + SCRAPE_WINDOW_SECONDS

    def scrape_done(self) -> None:
        self._open = max(0, self._open - 1)

    def active(self) -> bool:
        """True while readers should yield after each line."""
        return self._open > 0 and self._clock() < self._until
