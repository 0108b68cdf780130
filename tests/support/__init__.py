"""What tests/ and bench/ share: processes, waits, /metrics parsing, configs, real binaries.

* `binaries`: where a real binary is (qemu-system-x86_64, prometheus, nbdkit, ...); a missing
  one skips a developer's test and fails it under ``CI=true``.
* `waits`: poll a condition against a deadline (`wait_for` async, `wait_until` sync).
* `procs`: one subprocess wrapper (log file, systemd variables scrubbed, SIGTERM then SIGKILL,
  readiness over HTTP) for sync and async use; `free_port`, `stop_process`, `http_get`.
* `exporter`: the exporter CLI as such a process (`ExporterProcess`).
* `prometheus`: Prometheus, Alertmanager and a webhook receiver.
* `scrape`: one /metrics parser (`Metrics`), plus the substring fast path bench needs on
  multi-megabyte pages.
* `config`: exporter config builders and the interval presets.
* `qemu`: a real QEMU and nbdkit storage that fails on demand.

Nothing is re-exported here: import from the module, so bench pulls in only what it uses.
"""
