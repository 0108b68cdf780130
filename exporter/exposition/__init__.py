"""Exposition: how the metrics of `exporter.metrics` become the /metrics page.  The formats
byte for byte as prometheus_client writes them and the timed registry (`formats`), the per-VM
text cached between scrapes (`cache`) and the host-wide families built at each scrape (`host`).

May import: ``exporter.metrics`` and what it reads (``exporter.model``, ``exporter.hang``);
``exporter.metrics`` never imports it.
"""
