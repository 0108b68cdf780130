"""ScrapeFirst: QMP readers yield while a scrape is served, and never for longer."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.registry import CollectorRegistry

from exporter.fairness import SCRAPE_WINDOW_SECONDS, ScrapeFirst
from exporter.web import make_app


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
