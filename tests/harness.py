"""Run the exporter as a real subprocess and read its /metrics over HTTP.

Waiting is done by polling a condition against a deadline (`wait_for`), never by sleeping a
fixed time and hoping.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class Metrics:
    """A parsed /metrics page."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = []
        self.types: dict[str, str] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.samples.append(Sample(s.name, dict(s.labels), float(s.value)))

    def find(self, name: str, **labels: str) -> list[Sample]:
        return [
            s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the single matching sample, None when there is none."""
        found = self.find(name, **labels)
        if len(found) > 1:
            raise AssertionError(f"{name}{labels} matches {len(found)} samples")
        return found[0].value if found else None

    def label_values(self, name: str, label: str, **labels: str) -> set[str]:
        return {s.labels[label] for s in self.find(name, **labels) if label in s.labels}


async def wait_for(
    check: Callable[[], Awaitable[T | None]], timeout: float = 10.0, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = await check()
        except AssertionError as exc:
            result, last = None, exc
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})")
        await asyncio.sleep(0.05)


class ExporterProcess:
    """The exporter CLI in a subprocess, configured through a YAML file."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        cfg = dict(config)
        cfg.setdefault("web", {})["listen_address"] = f"127.0.0.1:{self.port}"
        cfg.setdefault("log", {}).setdefault("level", "debug")
        self.config_path = workdir / "exporter.yml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = workdir / "exporter.log"
        self.extra_args = list(extra_args)
        self.env = dict(env or {})  # on top of ours (e.g. NOTIFY_SOCKET, WATCHDOG_USEC)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        # A test runner started by systemd must not lend its notify socket to the exporter.
        inherited = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
        env = dict(inherited, PYTHONUNBUFFERED="1", **self.env)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", f"--config.file={self.config_path}", *self.extra_args],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        await wait_for(self._ready, timeout=15, what="exporter /healthz")

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"exporter exited with {self.proc.returncode}:\n{self.log()}")
        try:
            async with aiohttp.ClientSession() as s, s.get(self.url + "/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def scrape(self, path: str = "/metrics", headers: dict[str, str] | None = None) -> Metrics:
        async with aiohttp.ClientSession() as s, s.get(self.url + path, headers=headers) as r:
            assert r.status == 200, await r.text()
            return Metrics(await r.text())

    async def wait_metrics(
        self, check: Callable[[Metrics], bool], timeout: float = 10.0, what: str = "metrics"
    ) -> Metrics:
        async def probe() -> Metrics | None:
            m = await self.scrape()
            return m if check(m) else None

        return await wait_for(probe, timeout, what)

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    async def __aenter__(self) -> ExporterProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.terminate()
