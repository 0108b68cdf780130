"""The exporter as a process: event-loop heartbeat and stalled-reader detection behind /healthz
(`liveness`), the intervals in which the exporter could not see events (`blind`: a stopped
loop, a session or connection down), the systemd notify/watchdog protocol (`sd_notify`), the
garbage collector's policy at fleet scale (`gc_tuning`), the open-file limit (`fd_limit`),
logfmt/JSON logging (`logsetup`) and scrapes first during event storms (`fairness`).

May import: ``exporter.model``, ``exporter.config``, ``exporter.metrics`` and (liveness, for
the readers it watches) ``exporter.qmp_watch``.
"""
