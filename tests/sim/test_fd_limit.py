"""The open-file limit (`exporter.runtime.fd_limit`): every watched QMP socket is a descriptor.

The exporter runs under ``prlimit``.  With a soft limit below the hard one it raises its own
and watches every socket; with no room to raise (soft = hard), it holds no more sessions than
the limit leaves room for beside its reserve, shows the other VMs down with reason
``fd_limit``, keeps answering scrapes, and watches the waiting sockets once others go away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.runtime.fd_limit import FD_RESERVE
from qmpsim import DiskSpec, SimVM
from tests.sim.test_exporter_sim import running
from tests.support.binaries import require_binary
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics

N_VMS = 30
BUDGET = 20  # sessions: the soft limit is FD_RESERVE + BUDGET


class LimitedExporter(ExporterProcess):
    """The exporter started by ``prlimit --nofile=SOFT:HARD``."""

    def __init__(self, workdir: Path, config: dict[str, Any], soft: int, hard: int) -> None:
        super().__init__(workdir, config)
        self.nofile = f"{soft}:{hard}"

    def argv(self) -> list[str]:
        return [require_binary("prlimit"), f"--nofile={self.nofile}", *self.command()]


def fleet(tmp: Path) -> list[SimVM]:
    disk = DiskSpec(
        id="virtio-disk0", werror="retry", rerror="retry", retry_interval_ms=1000, retry_timeout_ms=0
    )
    return [SimVM(str(tmp / f"vm{i:02d}.qmp"), name=f"vm{i:02d}", disks=[disk]) for i in range(N_VMS)]


def up(m: Metrics) -> set[str]:
    return {s.labels["vm"] for s in m.find("qemu_qmp_up") if s.value == 1}


async def test_sessions_stay_within_the_open_file_limit(short_tmp: Path) -> None:
    cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}
    limit = FD_RESERVE + BUDGET
    async with (
        running(fleet(short_tmp)) as vms,
        LimitedExporter(short_tmp, cfg, soft=limit, hard=limit) as exp,
    ):
        m = await exp.wait_metrics(lambda m: len(up(m)) == BUDGET, timeout=20, what=f"{BUDGET} VMs up")
        st = await exp.status()
        waiting = {d["vm"] for d in st["down"] if d["reason"] == "fd_limit"}
        assert len(waiting) == N_VMS - BUDGET and not waiting & up(m), st["down"]
        assert exp.log_path.read_text().count("the open-file limit is reached") == 1
        # Sockets go away (VMs shut down): the waiting ones are watched in their place.
        gone = sorted(up(m))[: N_VMS - BUDGET]
        for vm in vms:
            if vm.name in gone:
                await vm.kill()
        m = await exp.wait_metrics(lambda m: waiting <= up(m), timeout=20, what="the waiting VMs watched")
        assert len(up(m)) == BUDGET
        assert not [d for d in (await exp.status())["down"] if d["reason"] == "fd_limit"]


async def test_the_soft_limit_is_raised_to_the_hard_one(short_tmp: Path) -> None:
    cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}
    exporter = LimitedExporter(short_tmp, cfg, soft=FD_RESERVE + BUDGET, hard=4096)
    async with running(fleet(short_tmp)), exporter as exp:
        m = await exp.wait_metrics(lambda m: len(up(m)) == N_VMS, timeout=20, what="every VM up")
        assert not [d for d in (await exp.status())["down"] if d["reason"] == "fd_limit"]
        assert m.value("process_max_fds") == 4096
