"""Real Prometheus and Alertmanager on loopback, and a webhook receiver for Alertmanager.

Each runs in its own directory on a free port (`tests.support.procs.Process`): ``async with``
in tests, ``with`` in benchmarks; stopped (SIGTERM, then SIGKILL) when the block ends, also on
failure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.support.binaries import alertmanager_binary, require_binary
from tests.support.procs import Process, free_port


class Prometheus(Process):
    """The ``prometheus`` binary (Debian's) with ``config`` and ``rule_files`` (name -> text,
    written beside the config).  ``binary``: its path (default: found, or skip / fail).
    ``extra_args`` are appended (``--web.enable-remote-write-receiver``); with
    ``--enable-feature=agent`` among them it runs in agent mode (its own storage path, no
    rules)."""

    name = "prometheus"
    start_timeout = 60.0
    stop_timeout = 20.0  # it writes its TSDB head out first

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        rule_files: dict[str, str] | None = None,
        *,
        binary: str | None = None,
        log_level: str = "debug",
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.binary = binary or require_binary("prometheus")
        self.log_level = log_level
        self.extra_args = list(extra_args)
        for fname, text in (rule_files or {}).items():
            (workdir / fname).write_text(text)
        self.config_path = workdir / "prometheus.yml"
        self.write_config(config)

    @property
    def agent(self) -> bool:
        return "--enable-feature=agent" in self.extra_args or "--agent" in self.extra_args

    def write_config(self, config: dict[str, Any]) -> None:
        """(Re)write the config file; read at start (e.g. once `port` is known)."""
        self.config_path.write_text(yaml.safe_dump(config))

    def argv(self) -> list[str]:
        storage = "--storage.agent.path" if self.agent else "--storage.tsdb.path"
        argv = [
            self.binary,
            f"--config.file={self.config_path}",
            f"{storage}={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--log.level={self.log_level}",
        ]
        if not self.agent:  # agent mode refuses the flag: it has no rules
            # Resend firing alerts to Alertmanager every second (default 1m), so the pipeline
            # test does not depend on when the first send happened.
            argv.append("--rules.alert.resend-delay=1s")
        return argv + self.extra_args

    @staticmethod
    def _result(expr: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
        assert doc.get("status") == "success", (expr, doc)
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (GET /api/v1/query)."""
        return self._result(expr, await self.get_json("/api/v1/query", query=expr))

    def query_sync(self, expr: str) -> list[dict[str, Any]]:
        """`query`, blocking."""
        return self._result(expr, json.loads(self.get_sync("/api/v1/query", query=expr)))


class Alertmanager(Process):
    """``prometheus-alertmanager`` (Debian) / ``alertmanager``; clustering off unless
    ``cluster_args`` (``--cluster.listen-address=...``, ``--cluster.peer=...``) are given."""

    name = "alertmanager"

    def __init__(self, workdir: Path, config: dict[str, Any], cluster_args: Sequence[str] = ()) -> None:
        super().__init__(workdir)
        self.binary = alertmanager_binary()
        self.config_path = workdir / "alertmanager.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.cluster_args = list(cluster_args) or ["--cluster.listen-address="]

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            *self.cluster_args,
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
