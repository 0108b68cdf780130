"""Golden-file test of the complete /metrics output, and `promtool check metrics` on it.

Like node_exporter's end-to-end test: a fixed simulated fleet, the whole exposition compared
line by line, so any change of a name, label, HELP text or ordering is a visible diff.
Regenerate with ``UPDATE_GOLDEN=1 pytest tests/integration/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.conftest import require_binary
from tests.harness import REPO, ExporterProcess, Metrics
from tests.integration.test_exporter_sim import (
    EXPECTED_VIOLATIONS,
    all_disks_seen,
    fleet,
    fleet_config,
    running,
)

GOLDEN = REPO / "tests" / "golden" / "metrics.prom"

# Values that depend on the machine or on timing, not on the exporter's logic.
_VOLATILE = [
    (re.compile(r"^(qemu_exporter_build_info\{).*(\} )"), r"\1<build labels>\2"),
    (re.compile(r"^(qemu_block_idle_seconds\{.*\}) .*$"), r"\1 <seconds>"),
    (re.compile(r"^(qemu_exporter_event_loop_lag_seconds) .*$"), r"\1 <seconds>"),
    (re.compile(r'socket="[^"]*/([^"/]+)"'), r'socket="<dir>/\1"'),
]


def normalise(text: str) -> str:
    out = []
    for line in text.splitlines():
        for pattern, repl in _VOLATILE:
            line = pattern.sub(repl, line)
        out.append(line)
    return "\n".join(out) + "\n"


async def full_output(short_tmp: Path) -> str:
    async with running(fleet(short_tmp)), ExporterProcess(short_tmp, fleet_config(short_tmp)) as exp:
        m = await exp.wait_metrics(
            lambda m: (
                all_disks_seen(m) and len(m.find("qemu_block_read_bytes_total")) == len(EXPECTED_VIOLATIONS)
            ),
            what="every disk with its blockstats",
        )
        return m.text


async def test_full_metrics_output_matches_golden_file(short_tmp: Path) -> None:
    text = normalise(await full_output(short_tmp))
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "metrics output changed: review, then UPDATE_GOLDEN=1"


async def test_promtool_check_metrics_is_clean(short_tmp: Path) -> None:
    promtool = require_binary("promtool")
    text = await full_output(short_tmp)
    Metrics(text)  # parses
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
