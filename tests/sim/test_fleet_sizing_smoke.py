"""Smoke test of the sizing benchmark (bench/fleet_sizing.py): a tiny host, the page measured,
then the shipped agent and central Prometheus fed for a few seconds.

Checks that the tool works end to end and that its figures add up (every sample of the page
counted once, every host's series in the central head); the sizes themselves are not asserted:
they are what the benchmark is for (docs/fleet.md, "Sizing").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.fleet_sizing import SCRAPE_SERIES
from tests.support.binaries import require_binary
from tests.support.procs import REPO


def test_fleet_sizing_runs_and_adds_up(short_tmp: Path) -> None:
    require_binary("prometheus")
    out_json = short_tmp / "sizing.json"
    args = ["--vms=4", "--disks=2", "--hosts=2", "--interval=1", "--seconds=3", "--settle=1.5"]
    r = subprocess.run(
        [sys.executable, "-m", "bench.fleet_sizing", *args, f"--json={out_json}", f"--workdir={short_tmp}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("machine: nproc"), r.stdout
    for row in ("samples per scrape", "bytes per scrape, OpenMetrics / gzip", "head series per host"):
        assert row in r.stdout, r.stdout
    result = json.loads(out_json.read_text())
    page, central = result["page"], result["central"]
    assert page["samples"] == round(
        page["disk_samples_per_disk"] * 8 + page["vm_samples_per_vm"] * 4 + page["host_samples"]
    )
    assert page["samples_per_disk"] == page["samples"] / 8
    assert 0 < page["bytes_gzip"] < page["bytes_plain"]
    assert result["computed_samples_per_s"]["5s"] == (page["samples"] + SCRAPE_SERIES) / 5
    # Each of the two hosts' series reached the central head (plus what the rules record).
    assert central["hosts"] == 2
    assert central["head_series_per_host"] >= page["samples"] + SCRAPE_SERIES
    assert central["samples_per_s_measured"] > 0
