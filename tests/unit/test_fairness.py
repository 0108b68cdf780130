"""ScrapeFirst: QMP readers yield while a scrape is served, and never for longer."""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.registry import CollectorRegistry

from exporter.runtime.fairness import SCRAPE_WINDOW_SECONDS, ScrapeFirst
from exporter.web.server import make_app


def test_active_from_start_to_done() -> None:
    now = [100.0]
    sf = ScrapeFirst(clock=lambda: now[0])
    assert not sf.active()
    sf.scrape_started()
    sf.scrape_started()
    assert sf.active()
    sf.scrape_done()
    assert sf.active()  # the other scrape is still being written
    sf.scrape_done()
    assert not sf.active()
    sf.scrape_done()  # a stray end does not make the count negative
    sf.scrape_started()
    assert sf.active()


def test_a_scrape_that_never_ends_stops_counting_after_the_window() -> None:
    now = [100.0]
    sf = ScrapeFirst(clock=lambda: now[0])
    sf.scrape_started()  # its connection drops before the response is written
    now[0] += SCRAPE_WINDOW_SECONDS - 0.01
    assert sf.active()
    now[0] += 0.02
    assert not sf.active()


async def test_every_served_scrape_is_reported_done() -> None:
    sf = ScrapeFirst()
    app = make_app(CollectorRegistry(), "/metrics", scrape_first=sf)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for headers in ({}, {"Accept-Encoding": "gzip"}, {"Accept": "application/openmetrics-text"}):
            resp = await client.get("/metrics", headers=headers)
            assert resp.status == 200
            await resp.read()
            assert sf._open == 0
            assert not sf.active()


async def test_readers_wait_while_a_scrape_is_served() -> None:
    sf = ScrapeFirst()
    await asyncio.wait_for(sf.served(), 1)  # no scrape: at once
    sf.scrape_started()
    waiter = asyncio.create_task(sf.served())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not waiter.done()
    sf.scrape_done()
    await asyncio.wait_for(waiter, 1)


async def test_readers_wait_no_longer_than_the_window() -> None:
    sf = ScrapeFirst(window=0.05)
    sf.scrape_started()  # its connection drops: never done
    t0 = time.monotonic()
    await asyncio.wait_for(sf.served(), 5)
    assert time.monotonic() - t0 >= 0.04
    sf.scrape_started()  # a later scrape waits again, for its own window
    assert sf.active()
    await asyncio.wait_for(sf.served(), 5)
