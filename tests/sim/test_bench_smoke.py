"""Smoke test of the fleet benchmark (bench/fleet.py): a tiny fleet, every scenario, the table.

Checks that the tool works end to end and reports no lost event; timings are not asserted (CI
machines vary).  The full run and its results are in docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.prometheus import PROMETHEUS_2_ACCEPT, PROMETHEUS_3_ACCEPT
from tests.support.binaries import require_binary
from tests.support.procs import REPO


def run_fleet_bench(tmp: Path, *args: str, timeout: float = 120) -> tuple[str, dict[str, Any]]:
    """``python -m bench.fleet ARGS`` with its JSON and work files in ``tmp``: it must exit 0;
    its table (stdout) and its values."""
    out_json = tmp / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.fleet", *args, f"--json={out_json}", f"--workdir={tmp}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    values: dict[str, Any] = json.loads(out_json.read_text())["results"][0]["values"]
    return r.stdout, values


def test_fleet_benchmark_runs_and_prints_the_table(short_tmp: Path) -> None:
    stdout, values = run_fleet_bench(
        short_tmp,
        "--vms=20",
        "--disks=2",
        "--scrapes=20",
        "--rest-seconds=0.5",
        "--storm-seconds=1.5",
        "--interval-settle=1.5",
        "--hangs=2",
        "--floor-runs=2",
        "--cold-scrapes=0",
    )
    assert stdout.startswith("machine: nproc"), stdout
    assert "| metric | 20 VMs x 2 disks |" in stdout
    for row in (
        "connect s",
        "scrape p99 ms",
        "client floor ms",
        "hang visible ms",
        "1s lost",
        "hung/healthy p99",
    ):
        assert f"| {row} |" in stdout, stdout
    assert not [k for k in values if k.endswith("_error")], values
    assert values["series"] > 20 * 2 * 10
    assert values["storm1s_events"] > 0 and values["storm100ms_events"] > 0
    assert values["storm1s_lost"] == 0 and values["storm100ms_lost"] == 0
    assert values["storm1s_disconnects"] == 0


def test_fleet_benchmark_started_into_a_storm(short_tmp: Path) -> None:
    """``--scenarios stormstart``: every disk already failing when the exporter starts; each is
    shown hanging, then counted as one hang once the storage is back, nothing lost."""
    stdout, values = run_fleet_bench(
        short_tmp,
        "--vms=20",
        "--disks=2",
        "--scenarios=stormstart",
        "--storm-seconds=1.5",
        "--interval-settle=1.5",
    )
    for row in ("started into a storm: every disk shown hanging s", "start disks not 1 hang"):
        assert f"| {row} |" in stdout, stdout
    assert not [k for k in values if k.endswith("_error")], values
    assert values["stormstart_events"] > 0
    assert values["stormstart_lost"] == 0  # of the events written to it since it started
    assert values["stormstart_hangs"] == 20 * 2 and values["stormstart_split"] == 0
    assert values["stormstart_disconnects"] == 0


def test_fleet_benchmark_with_a_real_prometheus(short_tmp: Path) -> None:
    """``--scenarios prometheus`` runs the Prometheus binary against the exporter and against
    the static pages, and reads what it stored: every sample of the page, ``up`` 1."""
    require_binary("prometheus")
    _stdout, values = run_fleet_bench(
        short_tmp,
        "--vms=10",
        "--disks=2",
        "--scenarios=prometheus",
        "--prom-interval=1",
        "--prom-scrapes=3",
        timeout=180,
    )
    assert "prometheus_error" not in values, values
    assert values["prom_up"] == 1 and values["prom_scrapes"] >= 3
    assert values["prom_samples"] > 10 * 2 * 10
    for kind in ("om", "text"):
        assert len(values[f"prom_static_{kind}_durations_ms"]) >= 3


#: Accept headers whose answer must be byte for byte prometheus_client's: what Prometheus 2.x
#: and 3.x send, no header, each format and escaping scheme alone (dots and values escaping fall
#: back to prometheus_client's encoders), an OpenMetrics version without native histograms'
#: difference, and orders where quality values would choose otherwise (prometheus_client
#: ignores them).
ACCEPT_HEADERS = (
    "",
    PROMETHEUS_2_ACCEPT,
    PROMETHEUS_3_ACCEPT,
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text;version=2.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=0.0.4",
    *(f"application/openmetrics-text;version=1.0.0;escaping={e}" for e in ("underscores", "dots", "values")),
    *(f"text/plain;version=1.0.0;escaping={e}" for e in ("underscores", "dots", "values", "bogus")),
    "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.1",
    "text/plain;version=1.0.0;q=0.1,application/openmetrics-text;version=1.0.0;q=0.9",
)


@pytest.mark.parametrize("page", ["full", "default"])
def test_cached_exposition_equals_prometheus_client(page: str) -> None:
    """The scrape fast path (`generate_text`/`generate_openmetrics`: cached per-VM chunks,
    chosen by `exporter.web.server.negotiate`) renders byte for byte what prometheus_client's encoder
    for the same Accept header renders, in both formats, through state changes.  A
    prometheus_client Counter and Info sit in the registry beside the exporter's collector (on
    the full page and on the default one): its
    ``_created`` sample (a separate gauge family in text, inline in OpenMetrics) and ``_info``
    naming go through prometheus_client's own encoders."""
    import random

    from prometheus_client import Counter, Info
    from prometheus_client.exposition import choose_encoder

    from exporter.exposition.cache import ExporterCollector
    from exporter.exposition.formats import Registry, generate_text
    from exporter.hang.tracking import HangTracking
    from exporter.model.events import BlockIOError
    from exporter.model.policy import DiskPolicy, PolicyConfig, verify
    from exporter.model.state import BlockStats, Disk, Part, VMState
    from exporter.web.server import negotiate

    rnd = random.Random(7)
    policy_cfg = PolicyConfig(max_timeout_seconds=60, require_nonzero_timeout=True)
    vms: list[VMState] = []
    for i in range(30):
        vm = VMState.qmp(f"/run/x/vm{i:02d}.qmp", {"cluster": 'a"b\\c\nd'} if i % 3 == 0 else {})
        vm.up = i % 7 != 0
        vm.name = f"vm{i:02d}" if i % 5 else None
        vm.uuid, vm.qemu_version, vm.status = "u", "8.2.0", "running" if i % 4 else ""
        vm.retry_feature = bool(i % 2)
        disks = {}
        for j in range(3):
            p = DiskPolicy(
                werror="retry" if j % 2 else "stop",
                rerror="retry",
                retry_interval_ms=1000 if j % 3 else None,
                retry_timeout_ms=123456789 if j % 2 else 0,
                retry_feature=True,
            )
            dev = f"virtio-disk{j}"
            disks[dev] = Disk(
                dev, f"drive{j}", f"#block{j}", dev, "q", "virtio-blk", p, verify(p, policy_cfg)
            )
        vm.set_disks(disks)
        for j in (0, 2):
            vm.blockstats[f"virtio-disk{j}"] = BlockStats(
                read_bytes=rnd.randint(0, 10**12),
                read_time_s=rnd.random() * 1e7,
                idle_s=rnd.random() if j else None,
            )
        vm.changed(Part.STATS)
        vm.io_errors[("virtio-disk0", "write", "retry")] += i
        vm.io_errors[("gone", "write", "retry")] += 1
        vm.events["BLOCK_IO_ERROR"] += i
        vm.command_errors[("qom-get", "error")] += 1
        vm.changed(Part.COUNTERS)
        vms.append(vm)
    hangs = HangTracking(1.0)
    now = 1_700_000_000.0
    for vm in vms:
        if vm.up:
            hangs.on_disks(vm, now)
    clock = [now]
    registry = Registry()
    from exporter.model.collectors import COLLECTORS, DEFAULT_COLLECTORS

    collector = ExporterCollector(
        lambda: vms,
        ("cluster",),
        hangs=hangs,
        clock=lambda: clock[0],
        collectors=COLLECTORS if page == "full" else DEFAULT_COLLECTORS,
    )
    registry.register(collector)
    Counter("other_requests", 'A "counter" of another library.', ["path"], registry=registry).labels(
        "/"
    ).inc()
    Info("other_build", "Info of another library.", registry=registry).info({"version": "1"})

    def same() -> None:
        for accept in ACCEPT_HEADERS:
            ours, our_type = negotiate(accept)
            theirs, their_type = choose_encoder(accept)
            assert our_type == their_type, accept
            assert ours(registry).decode() == theirs(registry).decode(), accept
        # ... and the cached lines are what was compared, not a fallback to prometheus_client.
        assert "".join(collector.render("text")) in generate_text(registry).decode()

    same()
    for k, vm in enumerate(vms[:12]):
        event = BlockIOError(int(now) + 1 + 5e-6, "virtio-disk0", "write", "retry" if k % 3 else "report")
        hangs.on_event(vm, event)
    for dt in (1.5, 2.5, 30.0):  # hanging, still hanging, recovered by silence
        clock[0] = now + dt
        same()
    vms[3].blockstats.clear()
    vms[3].changed(Part.STATS)
    # What a poll does: new blockstats, rendered at once (ExporterCollector.on_blockstats); a
    # VM changed after its prerender must still show its latest state.
    for vm in vms[10:20]:
        vm.blockstats["virtio-disk0"] = BlockStats(write_ops=rnd.randint(0, 10**6))
        vm.changed(Part.STATS)
        collector.on_blockstats(vm, now)
    vms[11].blockstats["virtio-disk2"] = BlockStats(flush_ops=7)
    vms[11].changed(Part.STATS)
    collector.on_blockstats(vms[1], now)  # nothing of it changed
    vms[4].status = "paused"
    vms[5].io_errors[("virtio-disk0", "read", "retry")] += 1
    vms[5].changed(Part.COUNTERS)
    vms[6].end_session()
    vms[8].name = "renamed"
    del vms[9]
    same()


def test_journal_benchmark_runs(tmp_path: Path) -> None:
    """``python -m bench.journal`` (docs/incidents.md's figures) on a small fleet: it completes
    every hang, writes every record, and reports each figure."""
    r = subprocess.run(
        [sys.executable, "-m", "bench.journal", "--vms=20", "--disks=2", "--rounds=1", f"--dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    [one] = json.loads(r.stdout)["rounds"]
    assert one["hangs"] == 40 and one["bytes"] == len((tmp_path / "hangs.jsonl").read_bytes())
    assert len((tmp_path / "hangs.jsonl").read_bytes().splitlines()) == 40
    for key in ("tick_with_journal_ms", "write_thread_ms", "loop_lag_max_ms", "inline_write_ms"):
        assert one[key] >= 0
