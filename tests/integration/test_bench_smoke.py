"""Smoke test of the fleet benchmark (bench/fleet.py): a tiny fleet, every scenario, the table.

Checks that the tool works end to end and reports no lost event; timings are not asserted (CI
machines vary).  The full run and its results are in docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO


def test_fleet_benchmark_runs_and_prints_the_table(short_tmp: Path) -> None:
    out_json = short_tmp / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fleet",
            "--vms=20",
            "--disks=2",
            "--scrapes=20",
            "--rest-seconds=0.5",
            "--storm-seconds=1.5",
            "--interval-settle=1.5",
            "--hangs=2",
            "--floor-runs=2",
            f"--json={out_json}",
            f"--workdir={short_tmp}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("machine: nproc"), r.stdout
    assert "| metric | 20 VMs x 2 disks |" in r.stdout
    for row in (
        "connect s",
        "scrape p99 ms",
        "client floor ms",
        "hang visible ms",
        "1s lost",
        "hung/healthy p99",
    ):
        assert f"| {row} |" in r.stdout, r.stdout
    values = json.loads(out_json.read_text())["results"][0]["values"]
    assert values["series"] > 20 * 2 * 10
    assert values["storm1s_events"] > 0 and values["storm100ms_events"] > 0
    assert values["storm1s_lost"] == 0 and values["storm100ms_lost"] == 0
    assert values["storm1s_disconnects"] == 0
