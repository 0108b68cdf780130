"""What a real Prometheus sends and sees: its Accept headers, and a Prometheus server scraping
the fleet exporter (``python -m bench.fleet --prometheus``).

The Accept headers are those of Prometheus' ``scrape.acceptHeader`` with the default
``scrape_protocols``: 2.x lists OpenMetrics 1.0.0, OpenMetrics 0.0.1 and text 0.0.4; 3.x adds
text 1.0.0 and ``escaping=`` (``allow-utf-8`` with the default UTF-8 name validation) on the
1.0.0 entries, with weights counting down from 0.6.  Both put OpenMetrics 1.0.0 first, which is
what prometheus_client's negotiation (and the exporter's) answers with.
"""

from __future__ import annotations

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
