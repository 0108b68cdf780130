"""The exporter CLI (``python -m exporter``) as a subprocess, configured through a YAML file.

One wrapper for every caller: tests (``async with``, `scrape` gives a parsed `Metrics`) and
benchmarks (``with``, `scrape_text` gives the page as text, blocking).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from exporter.model.collectors import COLLECTORS
from tests.support.procs import REPO, Process, child_env
from tests.support.scrape import Metrics
from tests.support.waits import wait_for

#: The ``collectors`` config section that turns every collector on (`exporter.model.collectors`).
FULL_PAGE: dict[str, bool] = dict.fromkeys(COLLECTORS, True)


class ExporterProcess(Process):
    """``python -m exporter --config.file=WORKDIR/exporter.yml``, listening on a free port.

    ``config`` is the exporter's YAML config as a dict; ``web.listen_address`` is set here,
    ``log.level`` defaults to debug, and every collector is on (`FULL_PAGE`: the tests of the
    block statistics, the session counters... read them) unless ``config`` has a
    ``collectors`` section: ``{"collectors": {}}`` runs the default page.  ``env`` is added to the child's environment (e.g.
    ``NOTIFY_SOCKET``, which is otherwise never inherited)."""

    name = "exporter"
    ready_path = "/healthz"
    start_timeout = 30.0

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any],
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        cfg = dict(config)
        cfg["web"] = {**cfg.get("web", {}), "listen_address": f"127.0.0.1:{self.port}"}
        cfg["log"] = {"level": "debug", **cfg.get("log", {})}
        cfg.setdefault("collectors", FULL_PAGE)
        self.config_path = workdir / "exporter.yml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})

    def command(self) -> list[str]:
        """The exporter's command line (without whatever runs it)."""
        return [sys.executable, "-m", "exporter", f"--config.file={self.config_path}", *self.extra_args]

    def argv(self) -> list[str]:
        return self.command()

    def env(self) -> dict[str, str]:
        return child_env(self.extra_env)

    @property
    def cwd(self) -> Path:
        return REPO

    async def scrape(self, path: str = "/metrics", headers: dict[str, str] | None = None) -> Metrics:
        async with aiohttp.ClientSession() as s, s.get(self.url + path, headers=headers) as r:
            assert r.status == 200, await r.text()
            return Metrics(await r.text())

    async def status(self) -> dict[str, Any]:
        """``/api/v1/status`` (the status page's snapshot), parsed."""
        async with aiohttp.ClientSession() as s, s.get(self.url + "/api/v1/status") as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("application/json")
            data: dict[str, Any] = await r.json()
            return data

    async def wait_metrics(
        self, check: Callable[[Metrics], bool], timeout: float = 10.0, what: str = "metrics"
    ) -> Metrics:
        """Scrape until ``check`` holds for the page; fail after ``timeout`` seconds."""

        async def probe() -> Metrics | None:
            m = await self.scrape()
            return m if check(m) else None

        return await wait_for(probe, timeout, what)

    def scrape_text(self, timeout: float = 30.0, accept: str | None = None) -> str:
        """/metrics as text, blocking; ``accept``: the Accept header (none: the text format)."""
        return self.get_sync("/metrics", timeout, {"Accept": accept} if accept else None).decode()
