"""HTTP endpoints: ``/metrics`` (Prometheus text or OpenMetrics by ``Accept``; gzip when asked),
``/healthz`` and a landing page.

Rendering reads only memory, so it runs inline on the event loop: no executor hop, no lock;
only gzip of a large page goes to a thread.
"""

from __future__ import annotations

import asyncio
import html
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
    gzip_accepted,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector, CollectorRegistry

from exporter import __version__
from exporter.exposition.formats import generate_openmetrics, generate_text
from exporter.hang.journal import HangJournal
from exporter.runtime.fairness import ScrapeFirst
from exporter.web.journal_api import journal_routes
from exporter.web.status_page import status_routes

#: gzip level of /metrics (see `_gzip`).
GZIP_LEVEL = 1
_GZIP_INLINE_BYTES = 64 * 1024

REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
TELEMETRY_PATH_KEY = web.AppKey("telemetry_path", str)
SCRAPE_FIRST_KEY = web.AppKey("scrape_first", ScrapeFirst)
#: What is wrong with the exporter (one line), None when healthy (`exporter.runtime.liveness`).
HEALTH_KEY: web.AppKey[Callable[[], str | None]] = web.AppKey("health")

_LANDING = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>QEMU IO hang exporter</title></head>
<body>
<h1>QEMU IO hang exporter</h1>
<p>Version {version}. Watches QEMU QMP sockets for disk IO hangs and error policies.</p>
<ul><li><a href="{path}">Metrics</a></li><li><a href="/healthz">Health</a></li></ul>
</body></html>
"""


async def metrics(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY_KEY]
    scrape_first = request.app[SCRAPE_FIRST_KEY]
    scrape_first.scrape_started()  # QMP readers let the response through (exporter.runtime.fairness)
    try:
        encoder, content_type = negotiate(request.headers.get("Accept", ""))
        body = encoder(registry)
        headers = {"Content-Type": content_type}
        if gzip_accepted(request.headers.get("Accept-Encoding", "")):
            body = await _gzip(body)
            headers["Content-Encoding"] = "gzip"
            headers["Vary"] = "Accept-Encoding"
    except BaseException:
        scrape_first.scrape_done()
        raise
    return _MetricsResponse(scrape_first, body=body, headers=headers)


Encoder = Callable[[Collector], bytes]


def negotiate(accept: str) -> tuple[Encoder, str]:
    """The format prometheus_client's own handlers would answer ``accept`` with, and our
    encoder that writes it from cached text.

    prometheus_client's `choose_encoder` decides, so the choice is its by construction: the
    first ``application/openmetrics-text`` entry with no version or a version >= 1.0.0, or the
    first ``text/plain`` with a version >= 1.0.0, in the order listed (quality values are not
    read); ``escaping=`` is taken from that entry; otherwise the 0.0.4 text format.  Both
    Prometheus 2.x and 3.x list OpenMetrics 1.0.0 first (their headers: `bench.prometheus`).
    Its encoders are swapped for `generate_text`/`generate_openmetrics` with the same
    arguments, which write the same bytes (tests/sim/test_bench_smoke.py): an
    OpenMetrics scrape at 1000 VMs x 4 disks took 1.2-2.1 s (p50) with prometheus_client's
    encoder, 23-50 ms this way, like the text format (docs/performance-history.md).

    One difference: a version that `parse_version` cannot compare (``version=1.0.0a``) makes
    `choose_encoder` raise, which prometheus_client's servers turn into an error 500; here that
    header is answered like one without ``Accept``, in the 0.0.4 text format."""
    try:
        encoder, content_type = choose_encoder(accept)
    except TypeError:
        return generate_text, CONTENT_TYPE_PLAIN_0_0_4
    if encoder is generate_latest:
        return generate_text, content_type
    if isinstance(encoder, partial) and not encoder.args:
        if encoder.func is generate_latest:
            return partial(generate_text, **encoder.keywords), content_type
        if encoder.func is openmetrics.generate_latest:
            return partial(generate_openmetrics, **encoder.keywords), content_type
    return encoder, content_type  # a future prometheus_client's other format: its own encoder


async def _gzip(data: bytes) -> bytes:
    """Prometheus asks for gzip.  Level 1: on the 8 MB page of 1000 VMs it is ~3x faster than
    zlib's default level and still ~10x smaller; off the event loop when large (zlib releases
    the GIL), so QMP events keep flowing meanwhile."""
    if len(data) < _GZIP_INLINE_BYTES:
        return _gzip_now(data)
    return await asyncio.to_thread(_gzip_now, data)


def _gzip_now(data: bytes) -> bytes:
    c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


class _MetricsResponse(web.Response):
    """Tells `ScrapeFirst` when the page has been written (aiohttp writes it after the
    handler and the middlewares have returned)."""

    def __init__(self, scrape_first: ScrapeFirst, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._scrape_first: ScrapeFirst | None = scrape_first

    async def write_eof(self, data: bytes = b"") -> None:
        try:
            await super().write_eof(data)
        finally:
            if self._scrape_first is not None:
                self._scrape_first.scrape_done()
                self._scrape_first = None


async def healthz(request: web.Request) -> web.StreamResponse:
    problem = request.app[HEALTH_KEY]()
    if problem is not None:
        return web.Response(status=503, text=problem + "\n")
    return web.Response(text="ok\n")


async def landing(request: web.Request) -> web.StreamResponse:
    path = html.escape(request.app[TELEMETRY_PATH_KEY])
    return web.Response(text=_LANDING.format(version=__version__, path=path), content_type="text/html")


def make_app(
    registry: CollectorRegistry,
    telemetry_path: str,
    middlewares: Sequence[Middleware] = (),
    scrape_first: ScrapeFirst | None = None,
    health: Callable[[], str | None] = lambda: None,
    status: Callable[[bool], Mapping[str, Any]] | None = None,
    journal: HangJournal | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The HTTP app.  With ``status`` (a snapshot of `exporter.web.status`), ``/`` is the status
    page and ``/api/v1/status`` its JSON; without, ``/`` is a plain landing page.  With it too,
    ``/api/v1/hangs`` and ``/api/v1/incidents`` read ``journal`` (`exporter.web.journal_api`)."""
    # Scrapes and probes send tiny requests: refuse bodies instead of buffering them.
    app = web.Application(client_max_size=4096, middlewares=middlewares)
    app[REGISTRY_KEY] = registry
    app[TELEMETRY_PATH_KEY] = telemetry_path
    app[SCRAPE_FIRST_KEY] = scrape_first or ScrapeFirst()
    app[HEALTH_KEY] = health
    app.router.add_get(telemetry_path, metrics)
    app.router.add_get("/healthz", healthz)
    if status is not None:
        status_routes(app, status, telemetry_path)
        journal_routes(app, journal, clock)
    else:
        app.router.add_get("/", landing)
    return app
