"""Subprocesses for tests and benchmarks: one wrapper, usable from sync and async code.

`Process` starts a server binary on a free loopback port with its output in
``workdir/NAME.log``, waits until it answers its readiness path over HTTP (polled against a
deadline), and stops it with SIGTERM, then SIGKILL if it does not exit in time.  The child
never inherits systemd's notify and watchdog variables: a test runner started by systemd must
not lend its notify socket to what it starts.

    async with Prometheus(d, cfg) as prom: ...        # tests
    with ExporterProcess(d, cfg) as exp: ...           # bench (blocking)
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Self

import aiohttp

from tests.support.waits import wait_for, wait_until

#: The repository root: where ``python -m exporter`` and ``python -m qmpsim`` run.
REPO = Path(__file__).resolve().parents[2]
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (whoever binds it first wins)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without systemd's notify/watchdog variables, Python unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARS}
    return dict(env, PYTHONUNBUFFERED="1", **(extra or {}))


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Send ``sig`` (SIGTERM) and reap ``proc``; SIGKILL when it has not exited in ``timeout`` s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def read_pid(path: Path) -> int | None:
    """The pid in a pid file; None while it is missing or not yet written."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


# --- /proc ------------------------------------------------------------------------------------


def status_field(pid: int, key: str) -> list[str]:
    """The values of ``key`` in /proc/PID/status (``VmRSS`` -> ["1234", "kB"]); AssertionError
    when there is no such line."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, values = line.partition(":")
        if name == key:
            return values.split()
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """Resident memory of ``pid`` in KiB (``VmHWM``: its high-water mark)."""
    return int(status_field(pid, key)[0])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (threads included) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- HTTP -------------------------------------------------------------------------------------


class HTTPStatusError(RuntimeError):
    """An HTTP answer other than 200."""


def http_get(
    port: int,
    path: str,
    timeout: float = 30.0,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """GET ``http://127.0.0.1:PORT/PATH`` (``https`` with ``ssl_context``), blocking; the body
    of a 200, else HTTPStatusError."""
    if params:
        path += "?" + urllib.parse.urlencode(params)
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ssl_context)
        if ssl_context is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    )
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise HTTPStatusError(f"GET {path}: {r.status} {body[:200]!r}")
        return body
    finally:
        conn.close()


def http_post(port: int, path: str, body: Any, timeout: float = 30.0) -> Any:
    """POST ``body`` as JSON (blocking); the decoded JSON answer of a 200, else HTTPStatusError."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise HTTPStatusError(f"POST {path}: {r.status} {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


class Process:
    """A server subprocess on a free loopback port; subclasses give `argv` (and `ready_path`)."""

    name = "process"
    #: Answers 200 once the server is ready.
    ready_path = "/-/ready"
    start_timeout = 20.0
    stop_timeout = 10.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: time.monotonic() when the process was spawned.
        self.spawned = 0.0
        #: A server behind TLS: `url` is https, and the readiness probe trusts this context.
        self.ssl_context: ssl.SSLContext | None = None
        #: Headers of the readiness probe (e.g. basic auth).
        self.ready_headers: dict[str, str] = {}
        self._log: IO[bytes] | None = None

    # -- what to run (overridden) ----------------------------------------------------------

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return child_env()

    @property
    def cwd(self) -> Path:
        return self.workdir

    # -- state -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self) -> bool:
        """Whether it answers `ready_path` (blocking); RuntimeError once it has exited."""
        assert self.proc is not None, f"{self.name} not started"
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            http_get(self.port, self.ready_path, 2, self.ready_headers, ssl_context=self.ssl_context)
        except (OSError, http.client.HTTPException, HTTPStatusError):
            return False
        return True

    # -- lifecycle -------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process, without waiting for it to be ready."""
        self._log = self.log_path.open("wb")
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(), cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env()
        )

    async def start(self) -> None:
        """Spawn and wait until ready; stopped again when that fails."""
        self.spawn()
        try:
            await wait_for(lambda: asyncio.to_thread(self.ready), self.start_timeout, self._what())
        except BaseException:
            self.stop()
            raise

    def start_sync(self) -> None:
        """`start`, blocking (for scripts)."""
        self.spawn()
        try:
            wait_until(self.ready, self.start_timeout, self._what())
        except BaseException:
            self.stop()
            raise

    def _what(self) -> str:
        return f"{self.name} {self.ready_path}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Send ``sig`` (SIGTERM), SIGKILL after ``timeout``; the exit status (None: never started)."""
        rc = None
        if self.proc is not None:
            rc = stop_process(self.proc, sig, self.stop_timeout if timeout is None else timeout)
        if self._log is not None:
            self._log.close()
        return rc

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    def __enter__(self) -> Self:
        self.start_sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------

    def get_sync(
        self, path: str, timeout: float = 30.0, headers: Mapping[str, str] | None = None, **params: str
    ) -> bytes:
        return http_get(self.port, path, timeout, headers, params, self.ssl_context)

    async def get_text(self, path: str) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as r:
            assert r.status == 200, f"{path}: {r.status}"
            return await r.text()

    async def get_json(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.url + path, params=params) as r:
            assert r.status == 200, f"{path}: {r.status} {await r.text()}"
            return await r.json()
