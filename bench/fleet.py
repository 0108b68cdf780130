"""Fleet-scale benchmark: N simulated VMs, the exporter as a subprocess, a table of results.

    python -m bench.fleet --vms 100,500,1000 --disks 4

Every fleet runs in ``--fleets`` separate ``qmpsim run --fleet`` processes (each with its HTTP
control API), the exporter is started with ``python -m exporter`` and scraped over HTTP, CPU and
memory are read from ``/proc/PID``.  Per fleet size it measures (docs/performance.md):

* ``connect``: time from spawning the exporter until every VM shows ``qemu_qmp_up 1``;
* ``scrape``: p50/p99 over ``--scrapes`` back-to-back scrapes, the size of the page, and the
  floor: ``prometheus_client`` alone rendering the same series (Gauge objects, generate_latest);
  plain (no ``Accept`` header: the text format) and as Prometheus asks (its ``Accept`` header:
  OpenMetrics; and with gzip).  Scrapes 5.5 s apart and during storms send Prometheus' headers;
* ``prometheus`` (``--scenarios prometheus``): a real Prometheus (the ``prometheus`` binary)
  scrapes the exporter every ``--prom-interval`` s; its own ``scrape_duration_seconds`` and
  ``scrape_samples_scraped`` are read from its HTTP API (`bench.prometheus`); then the same
  for the exporter's two pages served ready-made (`bench.prometheus.StaticPage`): Prometheus'
  own share of its scrape duration;
* ``rest``: exporter RSS and CPU while the fleet is healthy;
* ``hang``: latency from a new hang's first BLOCK_IO_ERROR (QEMU timestamp) to
  ``qemu_block_io_hang 1`` in a scrape (upper bound: the scrape's response time);
* ``storm``: every disk failing with ``--in-flight`` requests each, retry interval 1 s and
  100 ms: events/s emitted by the simulators and processed by the exporter, exporter CPU and
  RSS, and the loss after the storm (simulator's BLOCK_IO_ERROR count minus the sum of
  ``qemu_block_io_error_events_total``; must be 0);
* ``stormstart`` (``--scenarios stormstart``): the exporter started into the fast storm (every
  disk already failing): connect time, time until every disk is shown hanging, then ``storm``'s
  measurements (each disk one hang when the storage is back);
* ``hung``: scrape p99 with ``--hung-fraction`` of the sockets accepting but never answering,
  as a ratio to the healthy run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import prometheus
from bench.prometheus import PROMETHEUS_2_ACCEPT, StaticPage
from tests.support.config import exporter_config
from tests.support.exporter import ExporterProcess
from tests.support.procs import REPO, Process, cpu_seconds, http_post, rss_kib, stop_process
from tests.support.scrape import count_equal, parse_series, sample_lines, sample_value, series_count, total
from tests.support.waits import wait_until

#: What the exporter answers Prometheus 2.x, and a client without Accept header (the static
#: pages of `run_prometheus` are served with the same).
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# --- processes ---------------------------------------------------------------------------


def proc_rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    return rss_kib(pid) / 1024, rss_kib(pid, "VmHWM") / 1024


class FleetProcess(Process):
    """One ``qmpsim run --fleet`` process with its control API (ready once the fleet is up)."""

    name = "qmpsim"
    ready_path = "/vms"
    start_timeout = 120.0
    stop_timeout = 20.0

    def __init__(self, workdir: Path, fleet_file: Path, k: int) -> None:
        self.name = f"fleet{k}"
        super().__init__(workdir)
        self.fleet_file = fleet_file

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "qmpsim", "run", "--fleet", str(self.fleet_file),
                "--control-listen", f"127.0.0.1:{self.port}"]  # fmt: skip

    @property
    def cwd(self) -> Path:
        return REPO

    def vms(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads(self.get_sync("/vms"))
        return data

    def block_io_errors(self, delivered: bool = False) -> int:
        """BLOCK_IO_ERROR events emitted; with ``delivered``, only those written to a connected
        QMP client (a VM's events before the exporter connected reach nobody)."""
        key = "block_io_errors_delivered" if delivered else "block_io_errors"
        return sum(int(v.get(key, 0)) for v in self.vms() if not v.get("hung"))

    def link_all(self, up: bool, in_flight: int | None = None) -> int:
        body: dict[str, Any] = {"up": up}
        if in_flight is not None:
            body["in_flight"] = in_flight
        return int(http_post(self.port, "/link", body)["disks"])

    def link(self, vm: str, disk: str, up: bool, in_flight: int | None = None) -> None:
        body: dict[str, Any] = {"up": up}
        if in_flight is not None:
            body["in_flight"] = in_flight
        http_post(self.port, f"/vms/{vm}/disks/{disk}/link", body)


@dataclass
class FleetSpec:
    vms: int
    disks: int
    interval_ms: int = 1000
    timeout_ms: int = 600_000  # storms last seconds: stay in the retry phase throughout
    hung_fraction: float = 0.0
    fleets: int = 2

    def names(self) -> list[str]:
        return [f"vm{i:04d}" for i in range(self.vms)]

    def hung_names(self) -> set[str]:
        n = round(self.vms * self.hung_fraction)
        if n == 0:
            return set()
        step = self.vms / n
        return {f"vm{int(i * step):04d}" for i in range(n)}


@contextlib.contextmanager
def running_fleet(spec: FleetSpec, workdir: Path) -> Iterator[list[FleetProcess]]:
    """Start the fleet split over ``spec.fleets`` qmpsim processes; stop them at the end."""
    hung = spec.hung_names()
    names = spec.names()
    procs: list[FleetProcess] = []
    try:
        for k in range(spec.fleets):
            part = names[k :: spec.fleets]
            sdir = workdir / f"f{k}"
            vms: list[dict[str, Any]] = []
            for name in part:
                if name in hung:
                    vms.append({"name": name, "hung": True})
                    continue
                disks = [
                    {
                        "id": f"virtio-disk{j}",
                        "werror": "retry",
                        "rerror": "retry",
                        "retry_interval_ms": spec.interval_ms,
                        "retry_timeout_ms": spec.timeout_ms,
                    }
                    for j in range(spec.disks)
                ]
                vms.append({"name": name, "disks": disks})
            if not vms:
                continue
            fleet_file = workdir / f"fleet{k}.yaml"
            fleet_file.write_text(yaml.safe_dump({"socket_dir": str(sdir), "vms": vms}))
            fp = FleetProcess(workdir, fleet_file, k)
            procs.append(fp)
            fp.spawn()
        for fp in procs:
            wait_until(fp.ready, fp.start_timeout, "qmpsim fleet start")
        yield procs
    finally:
        for fp in procs:
            fp.stop()


def fleet_exporter(workdir: Path, extra_config: dict[str, Any] | None = None) -> ExporterProcess:
    """The exporter watching ``<workdir>/f*/*.qmp``, at log level info: one "QMP session
    established" line per VM, which is how `wait_connected` sees the fleet come up without
    scraping (a scrape is real work for the exporter).  ``extra_config``: sections merged in."""
    cfg = exporter_config(globs=[workdir / "f*" / "*.qmp"], intervals={}, log_level="info")
    for k, v in (extra_config or {}).items():
        cfg.setdefault(k, {}).update(v)
    return ExporterProcess(workdir, cfg)


# --- reading /metrics (the fast path: pages are megabytes) -------------------------------


def count_up(text: str) -> int:
    return count_equal(text, "qemu_qmp_up", 1)


def io_error_total(text: str) -> int:
    return int(total(text, "qemu_block_io_error_events_total"))


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


# --- the floor: prometheus_client alone --------------------------------------------------


def client_floor(text: str, runs: int = 10) -> float:
    """Median seconds ``prometheus_client.generate_latest`` takes for the same series as
    ``text``, held in plain Gauge objects of a fresh CollectorRegistry."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    gauges: dict[str, tuple[Gauge, list[str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, labels = parse_series(series)
        if name not in gauges:
            names = [k for k, _ in labels]
            gauges[name] = (Gauge(name, "floor", names, registry=registry), names)
        g, names = gauges[name]
        child = g.labels(*[v for _, v in labels]) if names else g
        child.set(float(value))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- scenarios ---------------------------------------------------------------------------


@dataclass
class Result:
    vms: int
    disks: int
    values: dict[str, Any] = field(default_factory=dict)


def timed_scrapes(
    exp: ExporterProcess,
    n: int,
    gzip: bool = False,
    pause: float = 0.0,
    timeout: float = 30,
    accept: str | None = None,
) -> tuple[list[float], str]:
    """``n`` scrapes on one keep-alive connection; seconds each (request to last byte).
    ``accept``: the Accept header (none: the text format)."""
    conn = http.client.HTTPConnection("127.0.0.1", exp.port, timeout=timeout)
    headers = {"Accept-Encoding": "gzip"} if gzip else {}
    if accept:
        headers["Accept"] = accept
    times: list[float] = []
    body = b""
    try:
        for _ in range(n):
            time.sleep(pause)
            t0 = time.perf_counter()
            conn.request("GET", "/metrics", headers=headers)
            r = conn.getresponse()
            body = r.read()
            times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return times, "" if gzip else body.decode()


def cpu_window(pid: int, seconds: float) -> float:
    """Cores used by ``pid`` over the next ``seconds``."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def wait_connected(exp: ExporterProcess, n: int, timeout: float) -> float:
    """Seconds from spawning the exporter until ``n`` VMs are connected.

    Watched in the exporter's log ("QMP session established", one line per VM), every 20 ms:
    scraping the whole page that often would itself load the exporter (a scrape during
    connect re-renders most of the page) and measure the benchmark as much as the exporter.
    Confirmed afterwards by one scrape showing ``qemu_qmp_up 1`` for ``n`` VMs."""
    established = 0
    offset = 0

    def connected() -> bool:
        nonlocal established, offset
        with exp.log_path.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        offset += complete
        established += chunk[:complete].count(b'msg="QMP session established"')
        return established >= n

    wait_until(connected, timeout, f"{n} VMs connected", step=0.02)
    took = time.monotonic() - exp.spawned
    wait_until(lambda: count_up(exp.scrape_text()) >= n, 30, f"{n} VMs showing qemu_qmp_up 1", step=0.5)
    return took


def wait_blockstats(exp: ExporterProcess, n_disks: int, timeout: float = 60) -> None:
    wait_until(
        lambda: len(sample_lines(exp.scrape_text(), "qemu_block_read_bytes_total")) >= n_disks,
        timeout,
        "blockstats of every disk",
        step=0.2,
    )


def run_healthy(args: argparse.Namespace, n: int, workdir: Path, res: Result) -> None:
    spec = FleetSpec(n, args.disks, interval_ms=1000, fleets=args.fleets)
    with running_fleet(spec, workdir) as fleets, fleet_exporter(workdir) as exp:
        res.values["connect_s"] = wait_connected(exp, n, args.connect_timeout)
        wait_blockstats(exp, n * args.disks)
        time.sleep(1.0)
        res.values["rest_cpu"] = cpu_window(exp.pid, args.rest_seconds)
        res.values["rest_rss_mb"] = proc_rss_mb(exp.pid)[0]
        times, text = timed_scrapes(exp, args.scrapes)
        res.values["scrape_p50_ms"] = percentile(times, 50) * 1000
        res.values["scrape_p99_ms"] = percentile(times, 99) * 1000
        # Prometheus asks for gzip, and scrapes every 15-60 s: by then every VM was re-polled
        # (poll_interval 5 s), so nothing of the previous scrape's text can be reused.
        times, _ = timed_scrapes(exp, max(5, args.scrapes // 5), gzip=True)
        res.values["gzip_p50_ms"] = percentile(times, 50) * 1000
        # What Prometheus (2.x and 3.x alike) asks for: OpenMetrics first (issue 18).
        times, om_text = timed_scrapes(exp, args.scrapes, accept=PROMETHEUS_2_ACCEPT)
        res.values["om_p50_ms"] = percentile(times, 50) * 1000
        res.values["om_p99_ms"] = percentile(times, 99) * 1000
        res.values["om_ratio"] = res.values["om_p50_ms"] / res.values["scrape_p50_ms"]
        res.values["om_page_mb"] = len(om_text.encode()) / 1e6
        times, _ = timed_scrapes(exp, max(5, args.scrapes // 5), gzip=True, accept=PROMETHEUS_2_ACCEPT)
        res.values["om_gzip_p50_ms"] = percentile(times, 50) * 1000
        if args.cold_scrapes:
            times, _ = timed_scrapes(exp, args.cold_scrapes, pause=5.5, gzip=True, accept=PROMETHEUS_2_ACCEPT)
            res.values["cold_max_ms"] = max(times) * 1000
        res.values["series"] = series_count(text)
        res.values["page_mb"] = len(text.encode()) / 1e6
        res.values["floor_ms"] = client_floor(text, runs=args.floor_runs) * 1000
        res.values["hang_visible_ms"], res.values["hang_scrape_start_ms"] = hang_latency(args, exp, fleets, n)
        storm(args, exp, fleets, res, "1s", args.in_flight)


def hang_latency(
    args: argparse.Namespace, exp: ExporterProcess, fleets: list[FleetProcess], n: int
) -> tuple[float, float]:
    """Worst latency, over ``--hangs`` new hangs, from the first event's QEMU timestamp to a
    scrape that shows ``qemu_block_io_hang 1`` for the disk: to its response received (an
    upper bound, it includes that scrape), and to its start (clamped at 0: a scrape already
    under way when the event came may show it)."""
    worst = worst_start = 0.0
    for k in range(args.hangs):
        i = (k * 7919) % n
        vm, disk = f"vm{i:04d}", "virtio-disk0"
        fp = fleets[i % len(fleets)]
        fp.link(vm, disk, up=False, in_flight=1)
        seen = 0.0
        deadline = time.time() + 10
        text = ""
        # The exposition sorts labels, so the line is known in advance: a substring search
        # (milliseconds) keeps the client's own time between scrapes out of the measurement
        # (parsing 100,000 lines in Python took longer than a scrape).
        hanging = f'\nqemu_block_io_hang{{device="{disk}",vm="{vm}"}} 1.0\n'
        started = 0.0
        while time.time() < deadline:
            started = time.time()
            text = exp.scrape_text()
            seen = time.time()
            if hanging in text:
                break
        else:
            raise TimeoutError(f"hang of {vm}/{disk} not visible within 10 s")
        start = sample_value(text, "qemu_block_io_hang_start_timestamp_seconds", device=disk, vm=vm)
        assert start is not None
        worst = max(worst, seen - start)
        worst_start = max(worst_start, started - start)
        fp.link(vm, disk, up=True)
    return worst * 1000, worst_start * 1000


def hangs_per_disk(text: str) -> dict[tuple[str, str], float]:
    """Completed hangs of every disk (all outcomes) from ``qemu_block_io_hangs_total``."""
    out: dict[tuple[str, str], float] = {}
    for series, value in sample_lines(text, "qemu_block_io_hangs_total"):
        labels = dict(parse_series(series)[1])
        key = (labels.get("vm", ""), labels.get("device", ""))
        out[key] = out.get(key, 0.0) + value
    return out


def hanging_disks(text: str) -> int:
    return count_equal(text, "qemu_block_io_hang", 1)


def storm(
    args: argparse.Namespace,
    exp: ExporterProcess,
    fleets: list[FleetProcess],
    res: Result,
    label: str,
    in_flight: int,
    already_failing: bool = False,
) -> None:
    """Every disk fails with ``in_flight`` requests for ``--storm-seconds``; then all recover
    and the exporter's count must equal the simulators'.  ``already_failing``: the disks failed
    before the exporter started (`run_storm_start`); the window starts now.

    Also: the exporter's CPU per event counted in the window (µs/event), the worst scrape
    during the storm, RSS (now and high-water), catch-up measured from the storm's end (link
    up), and whether one continuous outage of a disk was counted as exactly one hang
    (``split``: disks whose ``qemu_block_io_hangs_total`` grew by anything but 1, once every
    hang has ended; being behind in reading must never look like recovery)."""
    if not already_failing:
        # Hangs of an earlier measurement (hang latency) end first: each disk starts idle.
        wait_until(lambda: hanging_disks(exp.scrape_text()) == 0, 60, "earlier hangs over", step=0.5)
    text = exp.scrape_text()

    def sim_count() -> int:
        """Events the exporter must count: every one emitted, or, when it started into the
        outage, every one written to it (QEMU sends a monitor with no client nothing)."""
        return sum(fp.block_io_errors(delivered=already_failing) for fp in fleets)

    # Started into the outage: everything written to it since it started.
    before_sim = 0 if already_failing else sim_count()
    before_exp = 0 if already_failing else io_error_total(text)
    hangs0 = hangs_per_disk(text)
    disconnects0 = total(text, "qemu_exporter_qmp_disconnects_total")
    if not already_failing:
        for fp in fleets:
            fp.link_all(up=False, in_flight=in_flight)
        time.sleep(1.0)  # ramp: the first attempts all come at once
    t0 = time.monotonic()
    c0 = cpu_seconds(exp.pid)
    e0 = io_error_total(exp.scrape_text())
    s0 = sum(fp.block_io_errors() for fp in fleets)
    scrape_times: list[float] = []
    rss_max = 0.0
    while time.monotonic() - t0 < args.storm_seconds:
        t_s = time.perf_counter()
        try:
            ts, _ = timed_scrapes(exp, 1, timeout=args.storm_seconds, gzip=True, accept=PROMETHEUS_2_ACCEPT)
            scrape_times += ts
        except OSError:  # a starved exporter: the scrape took longer than the storm
            scrape_times.append(time.perf_counter() - t_s)
        rss_max = max(rss_max, proc_rss_mb(exp.pid)[0])
        time.sleep(args.storm_scrape_interval)
    s1 = sum(fp.block_io_errors() for fp in fleets)
    e1 = io_error_total(exp.scrape_text())
    t1 = time.monotonic()
    c1 = cpu_seconds(exp.pid)
    rss, hwm = proc_rss_mb(exp.pid)
    for fp in fleets:
        fp.link_all(up=True)
    t_end = time.monotonic()
    # The simulators' count right after the link came back: at most one further attempt per
    # request was already under way.  Caught up = the exporter counted that many.
    at_end = sim_count() - before_sim
    lag = float("nan")
    with contextlib.suppress(TimeoutError):
        # An overloaded exporter answers scrapes late while it works through the backlog.
        wait_until(
            lambda: io_error_total(exp.scrape_text(timeout=120)) - before_exp >= at_end,
            180,
            "exporter catch-up",
            step=0.05,
        )
        lag = time.monotonic() - t_end
    # The next attempt of every held request succeeds; then no more events.
    time.sleep(max(0.0, args.interval_settle - (time.monotonic() - t_end)))
    delivered = sim_count() - before_sim
    with contextlib.suppress(TimeoutError):
        wait_until(
            lambda: io_error_total(exp.scrape_text(timeout=120)) - before_exp >= delivered,
            180,
            "exporter count",
            step=0.1,
        )
    # Every hang ends by silence (expected spacing + margin after the last error).
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: hanging_disks(exp.scrape_text(timeout=120)) == 0, 60, "hangs over", step=0.5)
    text = exp.scrape_text(timeout=120)
    got = io_error_total(text) - before_exp
    disconnects = total(text, "qemu_exporter_qmp_disconnects_total")
    hangs1 = hangs_per_disk(text)
    grew = {k: v - hangs0.get(k, 0.0) for k, v in hangs1.items()}
    dt = t1 - t0
    processed = e1 - e0
    res.values[f"storm{label}_offered_eps"] = (s1 - s0) / dt
    res.values[f"storm{label}_processed_eps"] = processed / dt
    res.values[f"storm{label}_cpu"] = (c1 - c0) / dt
    res.values[f"storm{label}_us_per_event"] = (c1 - c0) / processed * 1e6 if processed else float("nan")
    res.values[f"storm{label}_rss_mb"] = max(rss, rss_max)
    res.values[f"storm{label}_hwm_mb"] = hwm
    res.values[f"storm{label}_scrape_p99_ms"] = percentile(scrape_times, 99) * 1000
    res.values[f"storm{label}_scrape_max_ms"] = max(scrape_times, default=float("nan")) * 1000
    res.values[f"storm{label}_scrapes_ms"] = [round(t * 1000) for t in scrape_times]
    res.values[f"storm{label}_events"] = delivered
    res.values[f"storm{label}_lost"] = delivered - got
    res.values[f"storm{label}_catchup_s"] = lag
    res.values[f"storm{label}_disconnects"] = int(disconnects - disconnects0)
    res.values[f"storm{label}_hangs"] = int(sum(grew.values()))
    res.values[f"storm{label}_split"] = sum(1 for v in grew.values() if v != 1)


def run_fast_storm(args: argparse.Namespace, n: int, workdir: Path, res: Result) -> None:
    spec = FleetSpec(n, args.disks, interval_ms=args.fast_interval_ms, fleets=args.fleets)
    with running_fleet(spec, workdir) as fleets, fleet_exporter(workdir) as exp:
        wait_connected(exp, n, args.connect_timeout)
        wait_blockstats(exp, n * args.disks)
        storm(args, exp, fleets, res, "100ms", args.fast_in_flight)


def run_storm_start(args: argparse.Namespace, n: int, workdir: Path, res: Result) -> None:
    """The exporter (re)started into an outage: every disk already failing (the fast storm)
    when it starts, as after a restart in the middle of an incident.  How long until every VM
    is connected and every disk shown hanging, the first scrape after that, then `storm`'s
    measurements from there: each disk one hang once the storage is back, nothing lost of what
    QEMU sent once connected (events sent before are not replayed by QEMU: not counted)."""
    spec = FleetSpec(n, args.disks, interval_ms=args.fast_interval_ms, fleets=args.fleets)
    n_disks = n * args.disks
    with running_fleet(spec, workdir) as fleets:
        for fp in fleets:
            fp.link_all(up=False, in_flight=args.fast_in_flight)
        with fleet_exporter(workdir) as exp:
            res.values["start_connect_s"] = wait_connected(exp, n, args.connect_timeout)
            wait_until(
                lambda: hanging_disks(exp.scrape_text(timeout=30)) >= n_disks,
                60,
                "every disk shown hanging",
                step=0.1,
            )
            res.values["start_all_hanging_s"] = time.monotonic() - exp.spawned
            ts, _ = timed_scrapes(exp, 1, gzip=True, accept=PROMETHEUS_2_ACCEPT)
            res.values["start_first_scrape_ms"] = ts[0] * 1000
            storm(args, exp, fleets, res, "start", args.fast_in_flight, already_failing=True)


def run_floor(args: argparse.Namespace, n: int, workdir: Path, res: Result) -> None:
    """The fast storm read by `bench.floor` instead of the exporter: the simplest loop that
    reads and decodes the same events, on this machine (its CPU per event is the floor)."""
    spec = FleetSpec(n, args.disks, interval_ms=args.fast_interval_ms, fleets=args.fleets)
    out = workdir / "floor.json"

    def counts() -> dict[str, int]:
        try:
            data: dict[str, int] = json.loads(out.read_text())
        except (OSError, ValueError):
            return {"connected": 0, "events": 0}
        return data

    with running_fleet(spec, workdir) as fleets:
        log = (workdir / "floor.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.floor",
                "--glob",
                str(workdir / "f*" / "*.qmp"),
                "--out",
                str(out),
                "--decoder",
                args.floor_decoder,
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: counts()["connected"] >= n, args.connect_timeout, "floor connected")
            before_sim = sum(fp.block_io_errors() for fp in fleets)
            before = counts()["events"]
            for fp in fleets:
                fp.link_all(up=False, in_flight=args.fast_in_flight)
            time.sleep(1.0)
            t0, c0, e0 = time.monotonic(), cpu_seconds(proc.pid), counts()["events"]
            s0 = sum(fp.block_io_errors() for fp in fleets)
            time.sleep(args.storm_seconds)
            s1 = sum(fp.block_io_errors() for fp in fleets)
            t1, c1, e1 = time.monotonic(), cpu_seconds(proc.pid), counts()["events"]
            for fp in fleets:
                fp.link_all(up=True)
            time.sleep(args.interval_settle)
            delivered = sum(fp.block_io_errors() for fp in fleets) - before_sim
            wait_until(lambda: counts()["events"] - before >= delivered, 180, "floor catch-up")
        finally:
            stop_process(proc)
            log.close()
    dt = t1 - t0
    res.values["floor_offered_eps"] = (s1 - s0) / dt
    res.values["floor_processed_eps"] = (e1 - e0) / dt
    res.values["floor_cpu"] = (c1 - c0) / dt
    res.values["floor_us_per_event"] = (c1 - c0) / (e1 - e0) * 1e6 if e1 > e0 else float("nan")


def run_hung(args: argparse.Namespace, n: int, workdir: Path, res: Result) -> None:
    spec = FleetSpec(n, args.disks, hung_fraction=args.hung_fraction, fleets=args.fleets)
    healthy = n - len(spec.hung_names())
    with running_fleet(spec, workdir), fleet_exporter(workdir) as exp:
        wait_connected(exp, healthy, args.connect_timeout)
        wait_blockstats(exp, healthy * args.disks)
        # The same pause as the healthy run before its scrapes (1 s, then the CPU window):
        # right after connect the exporter still settles (one full GC collection).
        time.sleep(1.0)
        res.values["hung_rest_cpu"] = cpu_window(exp.pid, args.rest_seconds)
        times, _ = timed_scrapes(exp, args.scrapes)
        res.values["hung_scrape_p50_ms"] = percentile(times, 50) * 1000
        res.values["hung_scrape_p99_ms"] = percentile(times, 99) * 1000
        if "scrape_p99_ms" in res.values:
            res.values["hung_p99_ratio"] = res.values["hung_scrape_p99_ms"] / res.values["scrape_p99_ms"]


def run_prometheus(args: argparse.Namespace, n: int, workdir: Path, res: Result) -> None:
    """A real Prometheus scraping the healthy fleet's exporter: what it reports about its own
    scrapes (decompression, parsing and storing included) and the exporter's CPU meanwhile."""
    spec = FleetSpec(n, args.disks, interval_ms=1000, fleets=args.fleets)
    with running_fleet(spec, workdir) as _fleets, fleet_exporter(workdir) as exp:
        wait_connected(exp, n, args.connect_timeout)
        wait_blockstats(exp, n * args.disks)
        time.sleep(1.0)  # the settle collection after connect (exporter/runtime/gc_tuning.py)
        target = f"127.0.0.1:{exp.port}"
        timeout = args.prom_scrapes * args.prom_interval * 3 + 60
        with prometheus.scraping(workdir / "prometheus", target, args.prom_interval) as prom:
            c0, t0 = cpu_seconds(exp.pid), time.monotonic()
            report = prometheus.wait_scrapes(prom, args.prom_scrapes, timeout)
            res.values["prom_exporter_cpu"] = (cpu_seconds(exp.pid) - c0) / (time.monotonic() - t0)
        res.values.update(report)
        # Prometheus' own share: the same pages, served ready-made (bench.prometheus.StaticPage).
        pages = {
            "om": (exp.scrape_text(accept=PROMETHEUS_2_ACCEPT), OPENMETRICS_CONTENT_TYPE),
            "text": (exp.scrape_text(), TEXT_CONTENT_TYPE),
        }
    for kind, (page, content_type) in pages.items():
        with (
            StaticPage(page.encode(), content_type) as static,
            prometheus.scraping(workdir / f"prometheus-{kind}", static.target, args.prom_interval) as prom,
        ):
            floor = prometheus.wait_scrapes(prom, args.prom_scrapes, timeout)
        res.values[f"prom_static_{kind}_p50_ms"] = floor["prom_p50_ms"]
        res.values[f"prom_static_{kind}_max_ms"] = floor["prom_max_ms"]
        res.values[f"prom_static_{kind}_durations_ms"] = floor["prom_durations_ms"]


# --- output ------------------------------------------------------------------------------


def storm_columns(label: str) -> list[tuple[str, str, str]]:
    """The rows `storm` writes under ``label``."""
    return [
        (f"storm{label}_{key}", f"{label} {title}", spec)
        for key, title, spec in (
            ("offered_eps", "storm ev/s", "{:.0f}"),
            ("processed_eps", "processed ev/s", "{:.0f}"),
            ("cpu", "CPU", "{:.2f}"),
            ("us_per_event", "CPU us/event", "{:.1f}"),
            ("rss_mb", "RSS MB", "{:.0f}"),
            ("hwm_mb", "RSS high-water MB", "{:.0f}"),
            ("scrape_p99_ms", "scrape p99 ms", "{:.0f}"),
            ("scrape_max_ms", "scrape max ms", "{:.0f}"),
            ("lost", "lost", "{:d}"),
            ("catchup_s", "catch-up s", "{:.1f}"),
            ("disconnects", "disconn", "{:d}"),
            ("hangs", "hangs counted", "{:d}"),
            ("split", "disks not 1 hang", "{:d}"),
        )
    ]


COLUMNS: list[tuple[str, str, str]] = [
    ("connect_s", "connect s", "{:.2f}"),
    ("series", "series", "{:d}"),
    ("page_mb", "page MB", "{:.1f}"),
    ("scrape_p50_ms", "scrape p50 ms", "{:.1f}"),
    ("scrape_p99_ms", "scrape p99 ms", "{:.1f}"),
    ("gzip_p50_ms", "scrape p50 ms, gzip", "{:.1f}"),
    ("om_p50_ms", "Prometheus Accept (OpenMetrics) p50 ms", "{:.1f}"),
    ("om_p99_ms", "Prometheus Accept (OpenMetrics) p99 ms", "{:.1f}"),
    ("om_ratio", "OpenMetrics/plain p50", "{:.2f}"),
    ("om_page_mb", "OpenMetrics page MB", "{:.1f}"),
    ("om_gzip_p50_ms", "Prometheus Accept + gzip p50 ms", "{:.1f}"),
    ("cold_max_ms", "Prometheus headers, max ms 5.5 s apart", "{:.1f}"),
    ("floor_ms", "client floor ms", "{:.1f}"),
    ("rest_rss_mb", "RSS rest MB", "{:.0f}"),
    ("rest_cpu", "CPU rest", "{:.3f}"),
    ("hang_visible_ms", "hang visible ms", "{:.0f}"),
    ("hang_scrape_start_ms", "hang shown by a scrape started ms", "{:.0f}"),
    *storm_columns("1s"),
    *storm_columns("100ms"),
    ("start_connect_s", "started into a storm: connect s", "{:.2f}"),
    ("start_all_hanging_s", "started into a storm: every disk shown hanging s", "{:.2f}"),
    ("start_first_scrape_ms", "started into a storm: first scrape ms", "{:.0f}"),
    *storm_columns("start"),
    ("floor_offered_eps", "floor: storm ev/s", "{:.0f}"),
    ("floor_processed_eps", "floor: read ev/s", "{:.0f}"),
    ("floor_cpu", "floor: CPU", "{:.2f}"),
    ("floor_us_per_event", "floor: CPU us/event", "{:.1f}"),
    ("hung_rest_cpu", "hung CPU rest", "{:.3f}"),
    ("hung_scrape_p50_ms", "hung p50 ms", "{:.1f}"),
    ("hung_scrape_p99_ms", "hung p99 ms", "{:.1f}"),
    ("hung_p99_ratio", "hung/healthy p99", "{:.2f}"),
    ("prom_scrapes", "Prometheus: scrapes", "{:d}"),
    ("prom_up", "Prometheus: up", "{:.0f}"),
    ("prom_samples", "Prometheus: scrape_samples_scraped", "{:.0f}"),
    ("prom_first_ms", "Prometheus: first scrape_duration ms", "{:.0f}"),
    ("prom_p50_ms", "Prometheus: scrape_duration p50 ms", "{:.0f}"),
    ("prom_max_ms", "Prometheus: scrape_duration max ms", "{:.0f}"),
    ("prom_exporter_cpu", "Prometheus: exporter CPU", "{:.3f}"),
    ("prom_static_om_p50_ms", "Prometheus, static OpenMetrics page: p50 ms", "{:.0f}"),
    ("prom_static_om_max_ms", "Prometheus, static OpenMetrics page: max ms", "{:.0f}"),
    ("prom_static_text_p50_ms", "Prometheus, static text page: p50 ms", "{:.0f}"),
    ("prom_static_text_max_ms", "Prometheus, static text page: max ms", "{:.0f}"),
    ("healthy_error", "healthy: error", "{}"),
    ("storm100ms_error", "storm100ms: error", "{}"),
    ("stormstart_error", "stormstart: error", "{}"),
    ("hung_error", "hung: error", "{}"),
    ("prometheus_error", "prometheus: error", "{}"),
    ("floor_error", "floor: error", "{}"),
]


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def table(results: list[Result], fast_interval_ms: int = 100) -> str:
    """Markdown table: one row per measurement, one column per fleet size."""
    head = ["metric", *(f"{r.vms} VMs x {r.disks} disks" for r in results)]
    rows = [head, ["---"] * len(head)]
    for key, title, spec in COLUMNS:
        if not any(key in r.values for r in results):
            continue
        if key.startswith("storm100ms"):  # the fast storm's rows carry its actual interval
            title = title.replace("100ms", f"{fast_interval_ms}ms")
        rows.append([title, *(fmt(r.values.get(key), spec) for r in results)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def machine() -> str:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    return f"nproc {os.cpu_count()}, CPU {model}, RAM {mem} MiB, Python {sys.version.split()[0]}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", default="100,500,1000", help="comma-separated fleet sizes")
    p.add_argument("--disks", type=int, default=4, help="disks per VM")
    p.add_argument("--fleets", type=int, default=2, help="qmpsim processes the fleet is split over")
    p.add_argument("--scrapes", type=int, default=200, help="scrapes per latency measurement")
    p.add_argument("--rest-seconds", type=float, default=5.0, help="CPU window at rest")
    p.add_argument("--storm-seconds", type=float, default=10.0, help="length of each storm")
    p.add_argument("--in-flight", type=int, default=5, help="failing requests per disk, 1 s storm")
    p.add_argument("--fast-interval-ms", type=int, default=100, help="retry interval of the fast storm")
    p.add_argument("--fast-in-flight", type=int, default=2, help="failing requests per disk, 100 ms storm")
    p.add_argument(
        "--storm-scrape-interval", type=float, default=1.0, help="pause between scrapes in a storm, s"
    )
    p.add_argument("--interval-settle", type=float, default=2.5, help="wait after link up, seconds")
    p.add_argument("--hangs", type=int, default=5, help="new hangs timed for hang latency")
    p.add_argument("--hung-fraction", type=float, default=0.1, help="fraction of hung sockets")
    p.add_argument("--floor-runs", type=int, default=5, help="generate_latest runs for the floor")
    p.add_argument("--cold-scrapes", type=int, default=5, help="scrapes 5.5 s apart (0: skip)")
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p.add_argument(
        "--scenarios",
        default="healthy,storm100ms,hung",
        help="which of healthy (connect, scrapes, rest, hang, 1 s storm), storm100ms, stormstart (the "
        "exporter started into the fast storm), hung, prometheus, floor (the fast storm read by "
        "bench.floor instead of the exporter)",
    )
    p.add_argument("--prom-interval", type=float, default=5.0, help="Prometheus scrape interval, s")
    p.add_argument("--prom-scrapes", type=int, default=12, help="Prometheus scrapes to wait for")
    p.add_argument("--floor-decoder", choices=("orjson", "json"), default="orjson")
    p.add_argument("--json", metavar="FILE", help="also write the raw results here")
    p.add_argument("--workdir", help="keep sockets, fleet files and logs here (default: temporary)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = [int(x) for x in args.vms.split(",") if x]
    scenarios = set(args.scenarios.split(","))
    print(f"machine: {machine()}", flush=True)
    results: list[Result] = []
    for n in sizes:
        res = Result(n, args.disks)
        results.append(res)
        for name, fn in (
            ("healthy", run_healthy),
            ("storm100ms", run_fast_storm),
            ("stormstart", run_storm_start),
            ("hung", run_hung),
            ("prometheus", run_prometheus),
            ("floor", run_floor),
        ):
            if name not in scenarios or (name == "hung" and "healthy" not in scenarios):
                continue
            tmp = Path(tempfile.mkdtemp(prefix="qib-", dir=args.workdir or "/tmp"))
            try:
                t0 = time.monotonic()
                try:
                    fn(args, n, tmp, res)
                except Exception as exc:  # report it in the table and go on with the next scenario
                    res.values[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:120]
                    traceback.print_exc(file=sys.stderr)
                print(f"  {n} VMs: {name} done in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
            finally:
                if not args.workdir:
                    shutil.rmtree(tmp, ignore_errors=True)
    print(table(results, args.fast_interval_ms), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "results": [r.__dict__ for r in results]}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
