"""Issue "a hang journal and incident reports", end to end: the exporter as a subprocess with
its journal, simulated openEuler QEMUs (the retry policy exists in no installable QEMU) on one
NBD server whose storage fails for 6 s, over real unix sockets.

Two VMs, one disk each: ``short`` with a ``retry_timeout`` (2 s) shorter than the outage, whose
guest sees IO errors, and ``long`` (60 s), which recovers.  The exporter is SIGKILLed in the
middle of the outage and restarted.  The journal file, ``/api/v1/hangs``, ``/api/v1/incidents``,
the status page and ``qemu-iohang-report`` then show one incident on that backend with the two
disks, one recovered and one timed out, the timed-out guest in ``guests_saw_errors`` at its
timeout; times are QEMU's own (read from a second monitor of each VM); the same after a SIGTERM
and a SIGKILL restart; and a journal whose last line was cut still loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from qmpsim import DiskSpec, SimVM
from tests.qemu.rawqmp import raw_qmp
from tests.sim.test_exporter_sim import running
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.procs import REPO
from tests.support.scrape import Metrics
from tests.support.waits import wait_for

BACKEND = "nbd+unix:/run/nbd-store.sock"
OUTAGE_S = 6.0
FIELDS = [
    "vm",
    "uuid",
    "device",
    "backend",
    "start",
    "end",
    "duration_seconds",
    "outcome",
    "retry_timeout_seconds",
    "io_error_events",
    "source",
]


def vm(d: Path, name: str, timeout_ms: int) -> SimVM:
    disk = DiskSpec(
        id="virtio-disk0",
        werror="retry",
        rerror="retry",
        retry_interval_ms=500,
        retry_timeout_ms=timeout_ms,
        in_flight=0,
        filename="nbd+unix:///" + name + "?socket=/run/nbd-store.sock",
    )
    # The tap (a second monitor, not matched by the exporter's glob) shows what QEMU sent.
    return SimVM(str(d / f"{name}.qmp"), name=name, disks=[disk], extra_sockets=[str(d / f"{name}.tap")])


class Tap:
    """Every event QEMU writes to a second monitor, with QEMU's timestamp."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []

    def io_errors(self, action: str | None = None) -> list[float]:
        return [
            t
            for t, name, data in self.events
            if name == "BLOCK_IO_ERROR" and (action is None or data["action"] == action)
        ]


@contextlib.asynccontextmanager
async def tapped(path: Path) -> AsyncIterator[Tap]:
    tap = Tap()
    async with raw_qmp(path) as (client, _greeting):
        await client.execute("qmp_capabilities")

        async def read() -> None:
            while True:
                line = await client.read_line(timeout=3600)
                ev = line.obj
                if "event" in ev:
                    ts = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
                    tap.events.append((ts, ev["event"], ev.get("data", {})))

        task = asyncio.create_task(read())
        try:
            yield tap
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task


def journal_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def get(exp: ExporterProcess, path: str, **params: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(exp.url + path, params=params) as r:
        return r.status, await r.json()


def report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.tools.report", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def hung(m: Metrics, name: str) -> float | None:
    return m.value("qemu_block_io_hang", vm=name, device="virtio-disk0")


async def test_an_outage_in_the_journal_the_api_the_page_and_the_report(short_tmp: Path) -> None:
    journal = short_tmp / "hangs.jsonl"
    cfg = {
        "qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST, "poll_interval_seconds": 1.0},
        "hang": {"state_file": str(short_tmp / "state.json"), "journal_file": str(journal)},
    }
    vms = [vm(short_tmp, "short", 2000), vm(short_tmp, "long", 60000)]
    async with (
        running(vms) as (short, long_),
        tapped(short_tmp / "short.tap") as short_tap,
        tapped(short_tmp / "long.tap") as long_tap,
    ):
        exp = ExporterProcess(short_tmp, cfg)
        await exp.start()
        try:
            await exp.wait_metrics(
                lambda m: hung(m, "short") == 0 and hung(m, "long") == 0, what="both disks"
            )
            down = time.time()
            for v in (short, long_):
                v.link_down("virtio-disk0", in_flight=1, operations=("write",))

            # The short timeout passes: its record is in the file, written by the first exporter.
            await wait_for(
                lambda: asyncio.to_thread(journal_lines, journal), 10, "the timed-out hang's record"
            )
            m = await exp.scrape()
            assert hung(m, "long") == 1
            exp.stop(signal.SIGKILL)  # a crash in the middle of the outage
            exp = ExporterProcess(short_tmp, cfg)
            await exp.start()
            await exp.wait_metrics(lambda m: hung(m, "long") == 1, what="long still hanging after the crash")
            await asyncio.sleep(max(0.0, down + OUTAGE_S - time.time()))  # the outage's length
            for v in (short, long_):
                v.link_up("virtio-disk0")
            up = time.time()

            async def incident() -> list[dict[str, Any]] | None:
                status, doc = await get(exp, "/api/v1/incidents")
                assert status == 200, doc
                got = doc["incidents"]
                return got if got and got[0]["recovered"] == 1 else None

            incidents = await wait_for(incident, 10, "the incident with the recovered disk")
            lines = journal_lines(journal)
            assert [(x["vm"], x["outcome"]) for x in lines] == [("short", "timed_out"), ("long", "recovered")]
            check_records(lines, short_tap, long_tap, up, (short.uuid, long_.uuid))
            check_incident(incidents, lines)

            await check_api(exp, lines)
            await check_page(exp)
            check_report(exp, lines)

            # Restarted, gently then not: the same answers, nothing written twice.
            hangs_before = (await get(exp, "/api/v1/hangs"))[1]["hangs"]
            for sig in (signal.SIGTERM, signal.SIGKILL):
                exp.stop(sig)
                exp = ExporterProcess(short_tmp, cfg)
                await exp.start()
                await exp.wait_metrics(lambda m: hung(m, "long") == 0 and hung(m, "short") == 0)
                assert (await get(exp, "/api/v1/hangs"))[1]["hangs"] == hangs_before
                assert (await get(exp, "/api/v1/incidents"))[1]["incidents"] == incidents
                assert journal_lines(journal) == lines

            # Cut in the middle of its last line (a crash while writing): it still loads.
            exp.stop(signal.SIGKILL)
            raw = journal.read_bytes()
            journal.write_bytes(raw[: len(raw) - 30])
            exp = ExporterProcess(short_tmp, cfg)
            await exp.start()
            status, doc = await get(exp, "/api/v1/hangs")
            assert status == 200 and [h["vm"] for h in doc["hangs"]] == ["short"]
            m = await exp.scrape()
            assert m.value("qemu_exporter_hang_journal_corrupt_lines_total") == 1
            # ... and goes on: the next hang is a line of its own.
            await exp.wait_metrics(lambda m: hung(m, "long") == 0)
            long_.link_down("virtio-disk0", in_flight=1, operations=("write",))
            await exp.wait_metrics(lambda m: hung(m, "long") == 1)
            long_.link_up("virtio-disk0")
            await exp.wait_metrics(
                lambda m: m.value("qemu_exporter_hang_journal_records_total") == 1, what="the new record"
            )
            assert [(x["vm"], x["outcome"]) for x in journal_lines(journal)] == [
                ("short", "timed_out"),
                ("long", "recovered"),
            ]
        finally:
            exp.stop()


def check_records(
    lines: list[dict[str, Any]], short_tap: Tap, long_tap: Tap, up: float, uuids: tuple[str, str]
) -> None:
    """The records carry the issue's fields, QEMU's times and QEMU's event counts."""
    short, long_ = lines
    for x in lines:
        assert list(x) == FIELDS
        assert (x["device"], x["backend"], x["source"]) == ("virtio-disk0", BACKEND, "qmp")
        assert x["duration_seconds"] == x["end"] - x["start"]
    assert (short["uuid"], long_["uuid"]) == uuids
    # short: from its first failed attempt to the report that timed it out, both QEMU's stamps.
    retries, reports = short_tap.io_errors("retry"), short_tap.io_errors("report")
    assert abs(short["start"] - retries[0]) < 1e-6 and abs(short["end"] - reports[0]) < 1e-6
    assert short["retry_timeout_seconds"] == 2.0 and 2.0 <= short["duration_seconds"] < 3.0
    assert short["io_error_events"] == len(retries) + 1  # every attempt, and the report
    # long: its start survived the crash (the state file); the end is estimated (QEMU announces
    # no recovery) within one attempt spacing of the storage's return.
    errors = long_tap.io_errors()
    assert abs(long_["start"] - errors[0]) < 1e-6
    assert errors[-1] <= long_["end"] <= up + 1.0
    assert long_["retry_timeout_seconds"] == 60.0
    assert 0 < long_["io_error_events"] <= len(errors)  # those sent while it was down are lost to it


def check_incident(incidents: list[dict[str, Any]], lines: list[dict[str, Any]]) -> None:
    short, long_ = lines
    assert incidents == [
        {
            "backend": BACKEND,
            "start": min(short["start"], long_["start"]),
            "end": long_["end"],
            "duration_seconds": long_["end"] - min(short["start"], long_["start"]),
            "disks": 2,
            "vms": 2,
            "hangs": 2,
            "recovered": 1,
            "timed_out": 1,
            "vm_gone": 0,
            "guests_saw_errors": [
                {"vm": "short", "device": "virtio-disk0", "at": short["end"], "uuid": short["uuid"]}
            ],
        }
    ]


async def check_api(exp: ExporterProcess, lines: list[dict[str, Any]]) -> None:
    status, doc = await get(exp, "/api/v1/hangs")
    assert status == 200 and doc["schema"] == 1
    assert doc["hangs"] == sorted(lines, key=lambda x: x["start"], reverse=True)
    assert doc["until"] - doc["since"] == 86400
    assert [h["vm"] for h in (await get(exp, "/api/v1/hangs", outcome="timed_out"))[1]["hangs"]] == ["short"]
    assert (await get(exp, "/api/v1/hangs", backend="nfs://elsewhere"))[1]["hangs"] == []
    assert len((await get(exp, "/api/v1/hangs", since="2h", backend=BACKEND))[1]["hangs"]) == 2
    until = f"{min(x['start'] for x in lines) - 1:.3f}"
    assert (await get(exp, "/api/v1/incidents", until=until, since="1d"))[1]["incidents"] == []
    for path, params, message in (
        ("/api/v1/hangs", {"since": "yesterday"}, "since: 'yesterday' is neither a Unix time"),
        ("/api/v1/hangs", {"outcome": "ok"}, "outcome: 'ok' is not one of recovered, timed_out, vm_gone"),
        ("/api/v1/hangs", {"sinse": "2h"}, "unknown parameter 'sinse'"),
        ("/api/v1/incidents", {"backend": BACKEND}, "unknown parameter 'backend'"),
        ("/api/v1/incidents", {"since": "1h", "until": "2h"}, "is after until"),
    ):
        status, doc = await get(exp, path, **params)
        assert status == 400 and message in doc["error"], (path, params, doc)


async def check_page(exp: ExporterProcess) -> None:
    page = await exp.get_text("/")
    section = page[page.index('<section id="incidents">') :]
    section = section[: section.index("</section>")]
    assert "Storage incidents in the last 24 h <span" in section and '<details id="incidents-24h">' in section
    assert f'data-backend="{BACKEND}"' in section
    assert 'data-vm="short" data-device="virtio-disk0"' in section and 'data-vm="long"' not in section
    assert "1 incident: 2 disks hung, 1 guest saw IO errors" in section
    assert (await exp.status())["incidents"][0]["timed_out"] == 1


def check_report(exp: ExporterProcess, lines: list[dict[str, Any]]) -> None:
    dead = "http://127.0.0.1:1"
    r = report(f"--exporter.url={exp.url}", f"--exporter.url={dead}", "--output=json")
    assert r.returncode == 1, r.stderr  # one host could not be read: said so, the rest reported
    doc = json.loads(r.stdout)
    host = exp.url.removeprefix("http://")
    assert [(s["source"], s["read"], s["hangs"]) for s in doc["sources"]] == [
        (host, True, 2),
        ("127.0.0.1:1", False, 0),
    ]
    assert "Connection refused" in doc["sources"][1]["error"] and "127.0.0.1:1" in r.stderr
    [incident] = doc["incidents"]
    assert incident["guests_saw_errors"] == [
        {
            "vm": "short",
            "device": "virtio-disk0",
            "at": lines[0]["end"],
            "uuid": lines[0]["uuid"],
            "host": host,
        }
    ]

    r = report(f"--exporter.url={exp.url}")
    assert r.returncode == 0, r.stderr
    assert BACKEND in r.stdout and "Guests that saw IO errors (1)" in r.stdout
    [guest_row] = [line for line in r.stdout.splitlines() if line.startswith(host)]
    assert guest_row.split()[1:3] == ["short", "virtio-disk0"]

    r = report(f"--exporter.url={exp.url}", "--output=csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(x["vm"], x["outcome"], bool(x["guest_saw_errors_at"])) for x in rows] == [
        ("long", "recovered", False),
        ("short", "timed_out", True),
    ]
