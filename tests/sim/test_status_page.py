"""The status page at ``/`` in a real browser (headless Chromium) and its JSON at
``/api/v1/status``: the exporter as a subprocess watching simulated VMs over real unix sockets.

The browser's rendered DOM (``--dump-dom``) is what is asserted, not the HTML the server sent:
what a person sees.  Screenshots (desktop and phone width) are kept in the test's tmp dir; set
``STATUS_PAGE_SCREENSHOT=path.png`` to copy the desktop one out (how docs/status-page.png is
made).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from qmpsim import DiskSpec, SimVM
from tests.sim.test_exporter_sim import retry_disk, running
from tests.support.binaries import require_binary
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.procs import REPO
from tests.support.waits import wait_for

#: A VM name only a hostile or careless operator would choose: must show as text, never as markup.
EVIL = 'evil<b>"vm"</b>&amp;'


class Page(HTMLParser):
    """The rendered DOM as rows: section id -> list of (data-vm, data-device, cell texts)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: dict[str, list[tuple[str, str, list[str]]]] = {}
        self.tags: dict[str, int] = {}
        self.ids: list[str] = []  # in document order
        self._section = ""
        self._row: tuple[str, str, list[str]] | None = None
        self._cell: list[str] | None = None
        self.text_parts: list[str] = []
        self.feed(text)
        self.text = " ".join(self.text_parts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if a.get("id"):
            self.ids.append(a["id"] or "")
        if tag == "section":
            self._section = a.get("id") or ""
        elif tag in ("tr", "li") and "data-vm" in a:
            self._row = (a["data-vm"] or "", a.get("data-device") or "", [])
            self.rows.setdefault(self._section, []).append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row[2].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag in ("tr", "li"):
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text_parts.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, section: str, vm: str, device: str = "") -> list[str]:
        for v, d, cells in self.rows.get(section, []):
            if v == vm and d == device:
                return cells
        raise AssertionError(f"no row {vm!r}/{device!r} in section {section!r}: {self.rows.get(section)}")


def chromium(tmp: Path, *args: str) -> str:
    """Run headless Chromium once; its stdout.  A fresh profile per run, no sandbox (root in CI)."""
    binary = require_binary("chromium")
    profile = tmp / "chromium-profile"
    out = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    return out.stdout


async def dump_dom(tmp: Path, url: str) -> Page:
    return Page(await asyncio.to_thread(chromium, tmp, "--dump-dom", url))


def _screenshot(tmp: Path, url: str, path: Path, size: str) -> None:
    chromium(tmp, f"--screenshot={path}", f"--window-size={size}", url)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (path, len(data))


async def screenshot(tmp: Path, url: str, path: Path, size: str) -> None:
    await asyncio.to_thread(_screenshot, tmp, url, path, size)


async def wait_status(
    exp: ExporterProcess, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        st = await exp.status()
        return st if check(st) else None

    return await wait_for(probe, timeout, what)


def _has(items: list[dict[str, Any]], vm: str, device: str | None = None) -> bool:
    return any(i["vm"] == vm and (device is None or i["device"] == device) for i in items)


def retry(id: str, timeout_ms: int) -> DiskSpec:
    return retry_disk(id, retry_timeout_ms=timeout_ms)


async def test_status_page_in_a_browser(short_tmp: Path, tmp_path: Path) -> None:
    require_binary("chromium")
    vms = [
        SimVM(str(short_tmp / "hang.qmp"), name="hang", disks=[retry("virtio-disk0", 120_000)]),
        SimVM(str(short_tmp / "forever.qmp"), name="forever", disks=[retry("virtio-disk0", 0)]),
        SimVM(str(short_tmp / "tmo.qmp"), name="tmo", disks=[retry("virtio-disk0", 2000)]),
        SimVM(
            str(short_tmp / "evil.qmp"),
            name=EVIL,
            disks=[DiskSpec(id="virtio-disk0", werror="stop", rerror="report", in_flight=0)],
        ),
        SimVM(
            str(short_tmp / "good.qmp"),
            name="good",
            disks=[retry("virtio-disk0", 10_000), retry("virtio-disk1", 10_000)],
        ),
    ]
    missing = str(short_tmp / "gone.sock")  # watched while missing: down, "socket file missing"
    cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], "sockets": [missing], **FAST}}
    async with running(vms), ExporterProcess(short_tmp, cfg) as exp:
        await wait_status(exp, lambda s: s["summary"]["vms_up"] == 5, "5 VMs up")
        hang, forever, tmo, evil, _good = vms
        hang.link_down("virtio-disk0", in_flight=1, operations=("write",))
        forever.link_down("virtio-disk0", in_flight=1, operations=("write",))
        tmo.link_down("virtio-disk0", in_flight=1, operations=("write",))
        evil.link_down("virtio-disk0", in_flight=1, operations=("write",))  # stop policy: io-error
        st = await wait_status(
            exp,
            lambda s: (
                _has(s["hanging"], "hang")
                and _has(s["hanging"], "forever")
                and _has(s["failing"], "tmo")
                and _has(s["paused"], EVIL)
            ),
            "hanging, failing and paused",
        )
        assert {v["vm"] for v in st["violations"]} == {EVIL}
        assert {r["rule"] for r in st["violations"][0]["rules"]} == {"werror_not_retry", "rerror_not_retry"}
        down = [d for d in st["down"] if d["socket"] == missing]
        assert down and down[0]["reason"] == "not_found", st["down"]

        page = await dump_dom(tmp_path, exp.url + "/")
        # Problems first, in this order, before the compliant fleet and the recent hangs.
        sections = ("backends", "hanging", "failing", "paused", "violations", "down", "fleet", "recent")
        order = [i for i in page.ids if i in sections]
        assert order == list(sections), page.ids
        cells = page.row("hanging", "hang", "virtio-disk0")
        assert cells[0] == "hang" and cells[1] == "virtio-disk0", cells
        assert cells[2] == st["hanging"][0]["backend"], cells  # the storage behind it
        assert cells[4].endswith(" s"), cells  # elapsed
        assert "2 m 00 s timeout" in cells[5] and "left" in cells[5], cells
        assert "never times out" in page.row("hanging", "forever", "virtio-disk0")[5]
        assert page.row("failing", "tmo", "virtio-disk0")[3] == "2.0 s"
        assert page.row("paused", EVIL)[1] == "io-error"
        v = page.row("violations", EVIL, "virtio-disk0")
        assert v[0] == EVIL and v[2] == "stop/report", v  # the name shown as text, escaped
        assert "werror_not_retry" in v[4] and "Set werror=retry" in v[4], v
        assert "rerror_not_retry" in v[4] and "Set rerror=retry" in v[4], v
        assert page.row("down", "gone")[2] == "socket file missing"
        assert page.tags.get("b", 0) == 0  # the evil name's <b> never became an element
        assert page.tags.get("script") == 1
        assert "good" in [vm for vm, _d, _c in page.rows["fleet"]]
        # Only "good" has no problem; the retry disks that hang or fail still comply with the policy.
        assert "1 VM without problems; 5 of 6 disks comply" in page.text, page.text

        shots = tmp_path / "screenshots"
        shots.mkdir()
        await screenshot(tmp_path, exp.url + "/", shots / "status-page.png", "1200,1000")
        await screenshot(tmp_path, exp.url + "/", shots / "status-page-phone.png", "390,1400")
        if target := os.environ.get("STATUS_PAGE_SCREENSHOT"):
            shutil.copyfile(shots / "status-page.png", target)

        # Storage back: the hang ends "recovered" and is listed with its length in recent hangs.
        hang.link_up("virtio-disk0")
        st = await wait_status(exp, lambda s: _has(s["recent_hangs"], "hang"), "hang recovered")
        recent = [r for r in st["recent_hangs"] if r["vm"] == "hang"]
        assert recent[0]["outcome"] == "recovered" and recent[0]["duration_seconds"] > 0
        page = await dump_dom(tmp_path, exp.url + "/")
        assert page.row("recent", "hang", "virtio-disk0")[4] == "recovered"
        assert page.row("recent", "tmo", "virtio-disk0")[4] == "timed_out"
        assert not any(vm == "hang" for vm, _d, _c in page.rows.get("hanging", []))


def test_status_page_benchmark_runs(short_tmp: Path) -> None:
    """bench/status_page.py end to end on a tiny fleet (timings are not asserted: CI varies)."""
    out = short_tmp / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.status_page", "--vms=10", "--disks=2", "--hanging=2",
         "--requests=3", f"--json={out}", f"--workdir={short_tmp}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert doc["summary"]["disks_hanging"] == 2
    assert [x["path"] for x in doc["results"]] == ["/", "/api/v1/status"]
