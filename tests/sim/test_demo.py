"""scripts/demo.py as a person runs it (with --with-prometheus): the status page URL comes first,
the page shows the demo fleet, and the shipped 50 % alert fires in Debian's Prometheus and
reaches Alertmanager."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from typing import Any

import aiohttp

from tests.support.binaries import alertmanager_binary, require_binary
from tests.support.procs import REPO, free_port
from tests.support.waits import wait_for


async def _get(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, (url, r.status)
        return await (r.json() if "/api/" in url else r.text())


async def test_demo_prints_the_status_page_first_and_alerts_fire() -> None:
    require_binary("prometheus")
    alertmanager_binary()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "scripts/demo.py", f"--port={port}", "--with-prometheus", "--duration=120",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []

    async def drain() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    reader = asyncio.create_task(drain())
    try:

        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError("demo exited:\n" + "\n".join(lines))
            return any("Press Ctrl-C" in x for x in lines)

        await wait_for(ready, 60, "the demo to print its URLs")
        text = "\n".join(lines)
        urls = re.findall(r"https?://127\.0\.0\.1:\d+\S*", text)
        assert urls[0] == f"http://127.0.0.1:{port}/", urls  # the status page first
        prom = next(u for u in urls if u.endswith("/alerts")).removesuffix("/alerts")
        am = next(u for u in urls if u.endswith("/#/alerts")).removesuffix("/#/alerts")

        async def page_shows_fleet() -> bool:
            page = await _get(urls[0])
            return "QEMU IO hang status" in page and "stop-policy" in page and "slow-storage" in page

        await wait_for(page_shows_fleet, 20, "the status page showing the demo fleet")

        async def fired() -> bool:
            doc = await _get(prom + "/api/v1/alerts")
            return any(
                a["labels"]["alertname"] == "QemuIOHangApproachingTimeout" and a["state"] == "firing"
                for a in doc["data"]["alerts"]
            )

        await wait_for(fired, 60, "QemuIOHangApproachingTimeout firing in Prometheus")

        async def in_alertmanager() -> bool:
            alerts = await _get(am + "/api/v2/alerts")
            return any(a["labels"]["alertname"] == "QemuIOHangApproachingTimeout" for a in alerts)

        await wait_for(in_alertmanager, 20, "the alert in Alertmanager")
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "\n".join(lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
