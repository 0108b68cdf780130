"""What one host costs a fleet's metrics backend (docs/fleet.md, "Sizing").

    python -m bench.fleet_sizing [--vms 40] [--disks 4] [--exporter-args='--collector.x ...']

Starts a simulated host (``qmpsim run --fleet`` with N VMs x D disks, healthy and compliant,
and the exporter with the given flags), then:

* **the page**: one scrape as Prometheus 2.x asks (OpenMetrics) and one also asking for gzip:
  samples per scrape, split into per-disk (a ``device`` label), per-VM (``vm`` without
  ``device``) and host-wide samples, samples per disk (everything / disks), and bytes per
  scrape plain and gzip;
* **the central store**: the shipped two-tier files (`tests.support.fleet`: ``agent.yml``,
  ``central.yml`` with the shipped rules, their Debian flags), a Prometheus agent scraping the
  exporter every ``--interval`` s and remote-writing to a central Prometheus (receiver).  The
  agent scrapes the one exporter as ``--hosts`` targets (the same address under different
  ``instance`` labels: that many hosts' worth of series for the price of one simulated host).
  For ``--seconds`` it reports the central Prometheus' ``prometheus_tsdb_head_series`` and
  ``process_resident_memory_bytes`` (and Go heap in use) before the agent starts and at the end:
  the growth divided by the hosts is the cost per host watched.  Samples/s ingested are
  measured (``prometheus_tsdb_head_samples_appended_total``) and computed for 5 s and 15 s
  intervals: (samples per scrape + Prometheus' 5 per target) / interval.

Memory figures over a minute include the TSDB head's first chunks and whatever the Go GC has not
returned; head series are exact.  Run bigger fleets (``--vms 1000``) only on an idle machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.fleet import FleetSpec, machine, running_fleet, wait_connected
from bench.page_budget import classify
from bench.prometheus import PROMETHEUS_2_ACCEPT
from tests.support.config import exporter_config
from tests.support.exporter import ExporterProcess
from tests.support.fleet import (
    AGENT_ARGS,
    CENTRAL_ARGS,
    JOB,
    agent_config,
    central_config,
    central_rule_files,
    prometheus_args,
    write_targets,
)
from tests.support.procs import http_get
from tests.support.prometheus import Prometheus
from tests.support.scrape import series_count
from tests.support.waits import wait_until

#: Series Prometheus adds per target and scrape (up, scrape_duration_seconds,
#: scrape_samples_scraped, scrape_samples_post_metric_relabeling, scrape_series_added).
SCRAPE_SERIES = 5
#: What the central Prometheus reports about itself.
CENTRAL_METRICS = (
    "prometheus_tsdb_head_series",
    "process_resident_memory_bytes",
    "go_memstats_heap_inuse_bytes",
    "prometheus_tsdb_head_samples_appended_total",
)


# --- the page ----------------------------------------------------------------------------


def page_report(exp: ExporterProcess, vms: int, disks: int) -> dict[str, Any]:
    """Samples and bytes of one scrape as Prometheus asks for it, plain and gzip."""
    plain = http_get(exp.port, "/metrics", headers={"Accept": PROMETHEUS_2_ACCEPT})
    packed = http_get(
        exp.port, "/metrics", headers={"Accept": PROMETHEUS_2_ACCEPT, "Accept-Encoding": "gzip"}
    )
    assert gzip.decompress(packed).count(b"\n") > 0, "no gzip answer"
    text = plain.decode()
    per_disk, per_vm, host = classify(text)
    samples = series_count(text)
    assert samples == per_disk + per_vm + host
    n_disks = vms * disks
    return {
        "samples": samples,
        "samples_per_disk": samples / n_disks,
        "disk_samples_per_disk": per_disk / n_disks,
        "vm_samples_per_vm": per_vm / vms,
        "host_samples": host,
        "bytes_plain": len(plain),
        "bytes_gzip": len(packed),
    }


def wait_page_stable(exp: ExporterProcess, settle_s: float, timeout: float) -> None:
    """Until the page's sample count has not changed for ``settle_s`` (a poll interval: every
    VM's statistics read once), after every VM connected."""
    last: dict[str, float] = {"count": -1.0, "since": time.monotonic()}

    def stable() -> bool:
        count = series_count(exp.scrape_text(accept=PROMETHEUS_2_ACCEPT))
        now = time.monotonic()
        if count != last["count"]:
            last.update(count=count, since=now)
        return now - last["since"] >= settle_s

    wait_until(stable, timeout, f"the page stable for {settle_s:g} s", step=0.5)


# --- the central store -------------------------------------------------------------------


def central_metrics(central: Prometheus) -> dict[str, float]:
    text = central.get_sync("/metrics").decode()
    out = {}
    for name in CENTRAL_METRICS:
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        assert m, f"{name} not in the central Prometheus' /metrics"
        out[name] = float(m.group(1))
    return out


@contextmanager
def two_tier(
    workdir: Path, exporter_port: int, hosts: int, interval: float
) -> Iterator[tuple[Prometheus, Prometheus]]:
    """The shipped central Prometheus, then an agent scraping the exporter as ``hosts`` targets."""
    central = Prometheus(
        workdir / "central",
        {},
        central_rule_files(),
        extra_args=prometheus_args(CENTRAL_ARGS),
        log_level="info",
    )
    central.write_config(central_config([], f"127.0.0.1:{central.port}", evaluation_interval="15s"))
    targets = workdir / "targets.yml"
    write_targets(targets, [(f"127.0.0.1:{exporter_port}", f"host{i}") for i in range(hosts)])
    agent = Prometheus(
        workdir / "agent",
        agent_config(
            targets, central.url + "/api/v1/write", scrape_interval=f"{interval:g}s", batch_send_deadline="5s"
        ),
        extra_args=prometheus_args(AGENT_ARGS),
        log_level="info",
    )
    with central:
        yield central, agent


def central_report(args: argparse.Namespace, exp: ExporterProcess, workdir: Path) -> dict[str, Any]:
    with two_tier(workdir, exp.port, args.hosts, args.interval) as (central, agent):
        wait_until(lambda: central_metrics(central)["prometheus_tsdb_head_series"] > 0, 60, "central ready")
        before, t0 = central_metrics(central), time.monotonic()
        with agent:
            scrapes = max(2, round(args.seconds / args.interval))
            expr = f'min(count_over_time(up{{job="{JOB}"}}[1h])) >= {scrapes}'
            wait_until(
                lambda: central.query_sync(expr),
                args.seconds * 3 + 60,
                f"{scrapes} scrapes centrally",
                step=1,
            )
            wait_until(
                lambda: (
                    central_metrics(central)["prometheus_tsdb_head_series"]
                    > before["prometheus_tsdb_head_series"]
                ),
                30,
                "the agent's series in the central head",
            )
            after, t1 = central_metrics(central), time.monotonic()
            agent_rss = float(
                re.findall(
                    r"^process_resident_memory_bytes (\S+)$", agent.get_sync("/metrics").decode(), re.M
                )[0]
            )
    grow = {k: after[k] - before[k] for k in CENTRAL_METRICS}
    return {
        "hosts": args.hosts,
        "seconds": round(t1 - t0, 1),
        "head_series_per_host": grow["prometheus_tsdb_head_series"] / args.hosts,
        "rss_mib_per_host": grow["process_resident_memory_bytes"] / args.hosts / 2**20,
        "heap_mib_per_host": grow["go_memstats_heap_inuse_bytes"] / args.hosts / 2**20,
        "central_rss_mib_before": before["process_resident_memory_bytes"] / 2**20,
        "central_rss_mib_after": after["process_resident_memory_bytes"] / 2**20,
        "samples_per_s_measured": grow["prometheus_tsdb_head_samples_appended_total"] / (t1 - t0),
        "agent_rss_mib": agent_rss / 2**20,
    }


# --- run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    spec = FleetSpec(args.vms, args.disks, interval_ms=1000, fleets=args.fleets)
    cfg = exporter_config(globs=[workdir / "f*" / "*.qmp"], intervals={}, log_level="info")
    cfg["collectors"] = {}  # the exporter's own defaults: --exporter-args decides (--collector.NAME)
    exp = ExporterProcess(workdir, cfg, extra_args=shlex.split(args.exporter_args))
    with running_fleet(spec, workdir), exp:
        wait_connected(exp, args.vms, args.connect_timeout)
        wait_page_stable(exp, args.settle, args.connect_timeout)
        result: dict[str, Any] = {"vms": args.vms, "disks": args.disks, "exporter_args": args.exporter_args}
        result["page"] = page = page_report(exp, args.vms, args.disks)
        per_scrape = page["samples"] + SCRAPE_SERIES
        result["computed_samples_per_s"] = {f"{i}s": per_scrape / i for i in (5, 15)}
        if not args.no_central:
            result["central"] = central_report(args, exp, workdir)
    return result


def table(r: dict[str, Any]) -> str:
    page = r["page"]
    rows = [
        ("host", f"{r['vms']} VMs x {r['disks']} disks, exporter args: {r['exporter_args'] or '(none)'}"),
        ("samples per scrape", f"{page['samples']}"),
        ("samples per disk (all / disks)", f"{page['samples_per_disk']:.1f}"),
        ("  per-disk series per disk", f"{page['disk_samples_per_disk']:.1f}"),
        ("  per-VM series per VM", f"{page['vm_samples_per_vm']:.1f}"),
        ("  host-wide series", f"{page['host_samples']}"),
        ("bytes per scrape, OpenMetrics / gzip", f"{page['bytes_plain']} / {page['bytes_gzip']}"),
        *(
            (f"samples/s ingested at {k} (computed)", f"{v:.0f}")
            for k, v in r["computed_samples_per_s"].items()
        ),
    ]
    c = r.get("central")
    if c:
        rows += [
            (f"central, {c['hosts']} host(s), {c['seconds']} s", ""),
            ("  head series per host", f"{c['head_series_per_host']:.0f}"),
            ("  RSS growth per host, MiB", f"{c['rss_mib_per_host']:.1f}"),
            ("  Go heap in use growth per host, MiB", f"{c['heap_mib_per_host']:.1f}"),
            (
                "  RSS before / after, MiB",
                f"{c['central_rss_mib_before']:.0f} / {c['central_rss_mib_after']:.0f}",
            ),
            ("  samples/s ingested (measured)", f"{c['samples_per_s_measured']:.0f}"),
            ("  agent RSS, MiB", f"{c['agent_rss_mib']:.0f}"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sizing", description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=40, help="VMs on the simulated host")
    p.add_argument("--disks", type=int, default=4, help="disks per VM")
    p.add_argument("--exporter-args", default="", help="the exporter's flags, one string (e.g. collectors)")
    p.add_argument("--hosts", type=int, default=1, help="targets the agent makes of the one exporter")
    p.add_argument("--interval", type=float, default=5.0, help="the agent's scrape interval, s")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the agent feeds the central store")
    p.add_argument("--settle", type=float, default=6.0, help="page unchanged this long before measuring, s")
    p.add_argument("--fleets", type=int, default=2, help="qmpsim processes the VMs are split over")
    p.add_argument("--connect-timeout", type=float, default=180.0)
    p.add_argument("--no-central", action="store_true", help="only the page, no Prometheus")
    p.add_argument("--json", metavar="FILE", help="also write the raw results here")
    p.add_argument("--workdir", help="keep sockets, configs and logs here (default: temporary)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="qis-", dir=args.workdir or "/tmp"))
    try:
        result = run(args, tmp)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
