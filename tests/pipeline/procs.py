"""Real Prometheus, Alertmanager and a webhook receiver on loopback, for the pipeline tests.

Every process gets free ports and its own temporary directory, is started by the test and
always stopped (also on failure) by the ``async with`` blocks.  Readiness is polled against a
deadline (``tests.harness.wait_for``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.conftest import require_binary
from tests.harness import free_port, wait_for


class _Proc:
    name = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    async def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv(), stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        await wait_for(self._ready, timeout=20, what=f"{self.name} ready")

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            async with aiohttp.ClientSession() as s, s.get(self.url + "/-/ready") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

    async def get_text(self, path: str) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as r:
            assert r.status == 200, f"{path}: {r.status}"
            return await r.text()

    async def get_json(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.url + path, params=params) as r:
            assert r.status == 200, f"{path}: {r.status} {await r.text()}"
            return await r.json()

    async def __aenter__(self) -> Any:
        try:
            await self.start()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


class Alertmanager(_Proc):
    """``prometheus-alertmanager`` (Debian) / ``alertmanager``, clustering off."""

    name = "alertmanager"

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        super().__init__(workdir)
        self.binary = _alertmanager_binary()
        self.config_path = workdir / "alertmanager.yml"
        self.config_path.write_text(yaml.safe_dump(config))

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
            "--log.level=debug",
        ]

    async def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """GET /api/v2/alerts (active, silenced, inhibited, unprocessed: everything it holds)."""
        params = {"active": "true", "silenced": "true", "inhibited": "true", "unprocessed": "true"}
        async with aiohttp.ClientSession() as s:
            query = [*params.items(), *(("filter", f'{k}="{v}"') for k, v in filters.items())]
            async with s.get(self.url + "/api/v2/alerts", params=query) as r:
                assert r.status == 200, await r.text()
                result: list[dict[str, Any]] = await r.json()
                return result


def _alertmanager_binary() -> str:
    import shutil

    for name in ("prometheus-alertmanager", "alertmanager"):
        if shutil.which(name):
            return name
    return require_binary("prometheus-alertmanager")


class Prometheus(_Proc):
    name = "prometheus"

    def __init__(self, workdir: Path, config: dict[str, Any], rule_files: dict[str, str]) -> None:
        super().__init__(workdir)
        self.binary = require_binary("prometheus")
        for fname, text in rule_files.items():
            (workdir / fname).write_text(text)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=debug",
            # Resend firing alerts to Alertmanager every second (default 1m), so the pipeline
            # test does not depend on when the first send happened.
            "--rules.alert.resend-delay=1s",
        ]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        doc = await self.get_json("/api/v1/query", query=expr)
        assert doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result


@dataclass
class Arrival:
    received: float  # time.time() when the webhook got it
    path: str
    body: dict[str, Any]


class WebhookReceiver:
    """Alertmanager's webhook target: records every notification with its arrival time."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: list[Arrival] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        received = time.time()
        body = json.loads(await request.read())
        self.arrivals.append(Arrival(received, request.path, body))
        return web.Response(text="ok")

    def alerts(
        self, alertname: str | None = None, status: str | None = None
    ) -> list[tuple[float, dict[str, Any]]]:
        """(arrival time, alert) for every alert of every notification, in arrival order."""
        out = []
        for a in self.arrivals:
            for alert in a.body.get("alerts", []):
                if alertname is not None and alert["labels"].get("alertname") != alertname:
                    continue
                if status is not None and alert.get("status") != status:
                    continue
                out.append((a.received, alert))
        return out

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def alertmanager_config(webhook_url: str, group_wait: str = "0s") -> dict[str, Any]:
    """Route everything to the webhook at once, resolved notifications included."""
    return {
        "route": {
            "receiver": "hook",
            "group_by": ["alertname", "instance", "vm", "device"],
            "group_wait": group_wait,
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {"name": "hook", "webhook_configs": [{"url": webhook_url + "/hook", "send_resolved": True}]}
        ],
    }
