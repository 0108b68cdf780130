"""HTTP: the aiohttp server (`server`: /metrics with content negotiation and gzip, /healthz,
the status page and the APIs), the exporter-toolkit web config (`webconfig`: TLS, basic auth),
the status snapshot and its page (`status`, `status_page`) and the hang journal's API
(`journal_api`).

May import: everything below it (model, hang, metrics, runtime); nothing imports it but the
composition root (`exporter.app`) and the command-line tools (`exporter.tools`).
"""
