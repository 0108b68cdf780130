"""Per-backend aggregates (`exporter.hang.blast`): counted from real hang trackers, and the same
text through both ways a scrape is written."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import generate_latest

from exporter.exposition.cache import ExporterCollector
from exporter.exposition.formats import Registry, generate_text
from exporter.hang.tracking import HangTracking
from exporter.model.collectors import COLLECTORS
from exporter.model.events import BlockIOError
from exporter.model.policy import DiskPolicy, PolicyVerdict
from exporter.model.state import Disk, VMState


def disk(dev: str, backend: str) -> Disk:
    policy = DiskPolicy(
        werror="retry", rerror="retry", retry_interval_ms=1000, retry_timeout_ms=10000, retry_feature=True
    )
    return Disk(
        device=dev,
        drive="",
        node_name=f"n-{dev}",
        qdev=dev,
        qom_path=f"/machine/peripheral/{dev}",
        qdev_type="scsi-hd",
        policy=policy,
        verdict=PolicyVerdict(()),
        backend=backend,
    )


def vm(name: str, disks: dict[str, str]) -> VMState:
    v = VMState.qmp(f"/run/{name}.qmp")
    v.name, v.up = name, True
    v.set_disks({dev: disk(dev, b) for dev, b in disks.items()})
    return v


def samples(text: str, family: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('backend="', 1)[1].rstrip('"}')] = float(value)
    return out


@pytest.mark.parametrize("collectors", [COLLECTORS, {"backend"}], ids=["every collector", "backend alone"])
def test_one_failing_backend_counts_its_disks_and_vms_only(collectors: Iterable[str]) -> None:
    hangs = HangTracking(margin_s=1.0)
    vms = [
        vm("a", {"d0": "nbd://s1:10809", "d1": "nbd://s2:10809"}),
        vm("b", {"d0": "nbd://s1:10809", "d1": "nbd://s1:10809"}),
        vm("c", {"d0": "nbd://s2:10809", "d1": "block:/dev/sda"}),
    ]
    now = 1000.0
    for v in vms:
        hangs.on_disks(v, now)
    # Storage s1 fails: every disk on it hangs.
    for v, dev in (("a", "d0"), ("b", "d0"), ("b", "d1")):
        target = next(x for x in vms if x.name == v)
        hangs.on_event(target, BlockIOError(now, dev, "write", "retry"))
    # One disk of VM c on s2 timed out: failing, not hanging.
    c = vms[2]
    hangs.on_event(c, BlockIOError(now, "d0", "write", "report"))

    registry = Registry()
    registry.register(
        ExporterCollector(lambda: vms, hangs=hangs, clock=lambda: now + 0.5, collectors=collectors)
    )
    rendered = generate_text(registry).decode()
    collected = generate_latest(registry).decode()
    assert rendered == collected  # the two paths agree
    assert samples(collected, "qemu_storage_backend_disks") == {
        "block:/dev/sda": 1,
        "nbd://s1:10809": 3,
        "nbd://s2:10809": 2,
    }
    assert samples(collected, "qemu_storage_backend_hanging_disks") == {
        "block:/dev/sda": 0,
        "nbd://s1:10809": 3,
        "nbd://s2:10809": 0,
    }
    assert samples(collected, "qemu_storage_backend_affected_vms")["nbd://s1:10809"] == 2
    failing = samples(collected, "qemu_storage_backend_failing_disks")
    affected = samples(collected, "qemu_storage_backend_affected_vms")
    assert (failing["nbd://s2:10809"], affected["nbd://s2:10809"]) == (1, 1)
    assert (failing["nbd://s1:10809"], affected["block:/dev/sda"]) == (0, 0)
