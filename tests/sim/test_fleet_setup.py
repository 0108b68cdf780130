"""Sessions are set up a few at a time (`exporter.qmp.discovery.SETUP_CONCURRENCY`).

When a whole fleet connects at once, each VM's setup holds ~28 commands with their replies and
tasks; bounding how many VMs are set up together bounds that peak (docs/performance-history.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from exporter.config import Config, QMPConfig
from exporter.model.sink import EventSink
from exporter.qmp.discovery import Discovery
from tests.sim.servers import FakeConn, FakeQMP
from tests.support.waits import wait_for


class SlowSetup(FakeQMP):
    """A QEMU that is slow to tell its name; counts sessions between query-name and the end of
    setup (the first query-blockstats) across all instances."""

    in_setup = 0
    most_in_setup = 0

    async def on_command(self, conn: FakeConn, msg: dict[str, Any]) -> None:
        cmd = msg.get("execute")
        if cmd == "query-name":
            cls = type(self)
            cls.in_setup += 1
            cls.most_in_setup = max(cls.most_in_setup, cls.in_setup)
            await asyncio.sleep(0.05)  # a slow QEMU, not a synchronisation
        await self.answer(conn, msg, str(cmd))
        if cmd == "query-blockstats" and conn.commands.count("query-blockstats") == 1:
            type(self).in_setup -= 1


async def test_at_most_setup_concurrency_sessions_are_set_up_at_once(
    short_tmp: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr("exporter.qmp.discovery.SETUP_CONCURRENCY", 3)
    n = 12
    servers = [SlowSetup(str(short_tmp / f"vm{i}.qmp"), f"vm{i}") for i in range(n)]
    SlowSetup.in_setup = SlowSetup.most_in_setup = 0
    cfg = Config(qmp=QMPConfig(globs=(str(short_tmp / "*.qmp"),)))
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        discovery = Discovery(cfg, EventSink(), time.time)
        await discovery.sync()  # every watcher starts at once
        try:

            async def all_up() -> bool:
                return len(discovery.vms) == n and all(vm.up for vm in discovery.vms)

            await wait_for(all_up, timeout=20, what="every VM up")
        finally:
            await discovery.stop()
    assert SlowSetup.most_in_setup == 3
