"""What a real Prometheus sends and sees: its Accept headers, and a Prometheus server scraping
the fleet exporter (``python -m bench.fleet --scenarios prometheus``).

The Accept headers are those of Prometheus' ``scrape.acceptHeader`` with the default
``scrape_protocols``: 2.x lists OpenMetrics 1.0.0, OpenMetrics 0.0.1 and text 0.0.4; 3.x adds
text 1.0.0 and ``escaping=`` (``allow-utf-8`` with the default UTF-8 name validation) on the
1.0.0 entries, with weights counting down from 0.6.  Both put OpenMetrics 1.0.0 first, which is
what prometheus_client's negotiation (and the exporter's) answers with.
"""

from __future__ import annotations

import gzip
import http.server
import threading
from pathlib import Path
from typing import Any

from tests.support.binaries import find_binary
from tests.support.prometheus import Prometheus
from tests.support.waits import wait_until

#: Prometheus 2.x (2.42, Debian 12's, sends exactly this).
PROMETHEUS_2_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
#: Prometheus 3.x, default ``scrape_protocols`` and ``metric_name_validation_scheme: utf8``.
PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


def scraping(workdir: Path, target: str, interval_s: float) -> Prometheus:
    """The ``prometheus`` binary (Debian's, installed by scripts/install-system-deps.sh)
    scraping one target as job ``exporter`` every ``interval_s``, on a free loopback port, in
    its own directory (`tests.support.prometheus.Prometheus`: ``with`` starts and stops it)."""
    binary = find_binary("prometheus")
    if binary is None:
        raise RuntimeError("prometheus not found: run scripts/install-system-deps.sh")
    config = {
        "global": {"scrape_interval": f"{interval_s:g}s", "scrape_timeout": f"{interval_s:g}s"},
        "scrape_configs": [{"job_name": "exporter", "static_configs": [{"targets": [target]}]}],
    }
    return Prometheus(workdir, config, binary=binary, log_level="info")


def series(prom: Prometheus, metric: str) -> list[tuple[float, float]]:
    """Every stored (timestamp, value) of ``metric{job="exporter"}`` (one per scrape): the
    instant query of a range selector returns the raw samples."""
    result = prom.query_sync(f'{metric}{{job="exporter"}}[1h]')
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


def wait_scrapes(prom: Prometheus, n: int, timeout: float) -> dict[str, Any]:
    """Wait until Prometheus has scraped ``n`` times; report what it recorded: its
    ``scrape_duration_seconds`` (first scrape apart: it creates every series in the TSDB
    head) and ``scrape_samples_scraped``, and ``up``."""
    wait_until(
        lambda: len(series(prom, "scrape_duration_seconds")) >= n,
        timeout,
        f"{n} Prometheus scrapes",
        step=0.2,
    )
    durations = [v for _t, v in series(prom, "scrape_duration_seconds")]
    samples = [v for _t, v in series(prom, "scrape_samples_scraped")]
    up = [v for _t, v in series(prom, "up")]
    rest = sorted(durations[1:]) or durations
    return {
        "prom_scrapes": len(durations),
        "prom_up": min(up),
        "prom_samples": samples[-1],
        "prom_first_ms": durations[0] * 1000,
        "prom_p50_ms": rest[len(rest) // 2] * 1000,
        "prom_max_ms": rest[-1] * 1000,
        "prom_durations_ms": [round(d * 1000, 1) for d in durations],
    }


class StaticPage:
    """Serves fixed bytes at ``/metrics`` (gzip-compressed once, beforehand, when asked for
    gzip) with a fixed Content-Type, from a thread: Prometheus scraping it measures its own
    cost for a page — fetching, decompressing, parsing, storing — with next to nothing spent
    producing it.  The floor under `scrape_duration_seconds` for the exporter's page."""

    def __init__(self, body: bytes, content_type: str) -> None:
        packed = gzip.compress(body, 1)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                gz = "gzip" in self.headers.get("Accept-Encoding", "")
                data = packed if gz else body
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                if gz:
                    self.send_header("Content-Encoding", "gzip")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.target = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StaticPage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
