"""The hang journal on real QEMUs: what the journal and ``/api/v1/incidents`` say is QEMU's own.

Two QEMUs boot from one nbdkit server with ``werror=stop,rerror=stop`` (upstream QEMU has no
retry policy, domain.md §5: the retry policy's timeouts are shown with the simulator, in
tests/sim/test_journal.py).  The storage fails: both VMs pause on the error.  ``gone``'s
QEMU is then killed (its hang ends ``vm_gone``, after its session forgot the VM's disks); the
storage returns and management sends ``cont`` to ``keep`` (its hang ends ``recovered`` at QEMU's
``RESUME``).  The journal holds both hangs with QEMU's event timestamps, the backend derived
from the real NBD socket, and one incident on it: two disks, nobody timed out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.qemu.lab import Lab, nbd_disk_args, plain_qmp, wait_guest, watching_disk
from tests.support.config import REAL_QEMU, exporter_config
from tests.support.exporter import ExporterProcess
from tests.support.waits import wait_for

pytestmark = pytest.mark.qemu

DEVICE = "virtio-disk0"
POLICY = "werror=stop,rerror=stop"


def stamps(events: list[Any], name: str) -> list[float]:
    return [
        e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6 for e in events if e["event"] == name
    ]


def journal_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def test_the_journal_holds_qemus_times_and_one_incident(lab: Lab) -> None:
    storage = lab.storage()
    keep = lab.vm(nbd_disk_args(storage, DEVICE, POLICY), name="keep", subdir="keep")
    gone = lab.vm(nbd_disk_args(storage, DEVICE, POLICY), name="gone", subdir="gone")
    assert keep.mon2 is not None and gone.mon2 is not None
    journal = lab.workdir / "hangs.jsonl"
    d = lab.workdir / "exporter"
    d.mkdir()
    exp = ExporterProcess(
        d,
        {**exporter_config(keep.qmp, gone.qmp, intervals=REAL_QEMU), "hang": {"journal_file": str(journal)}},
    )
    lab.exporters.append(exp)
    await exp.start()
    backend = f"nbd+unix:{storage.socket}"

    async with plain_qmp(keep.mon2, "mgmt-keep") as mgmt_keep, plain_qmp(gone.mon2, "mgmt-gone") as mgmt_gone:
        for name, vm in (("keep", keep), ("gone", gone)):
            await watching_disk(exp, name, DEVICE)
            await wait_guest(vm, lambda s: "WRWR" in s, what=f"{name} doing IO")
        mgmt_keep.events.clear()
        mgmt_gone.events.clear()

        storage.fail()
        await exp.wait_metrics(
            lambda m: all(m.value("qemu_block_io_hang", vm=n, device=DEVICE) == 1 for n in ("keep", "gone")),
            timeout=20,
            what="both VMs paused on the error, their disks hanging",
        )
        await mgmt_gone.execute("query-status")  # every earlier event is in the listener now
        gone_events = [e for e in mgmt_gone.events.clear()]
        killed = time.time()
        gone.proc.kill()
        gone.proc.wait()
        lines = await wait_for(lambda: _lines(journal, 1), 15, "the killed VM's hang in the journal")
        detected = time.time()

        storage.recover()
        await mgmt_keep.execute("cont")
        lines = await wait_for(lambda: _lines(journal, 2), 15, "the resumed VM's hang in the journal")
        await mgmt_keep.execute("query-status")
        keep_events = [e for e in mgmt_keep.events.clear()]

    by_vm = {x["vm"]: x for x in lines}
    assert [x["vm"] for x in lines] == ["gone", "keep"]
    for x in lines:
        assert (x["device"], x["backend"], x["source"], x["retry_timeout_seconds"]) == (
            DEVICE,
            backend,
            "qmp",
            0.0,
        )
        assert x["uuid"] == "00000000-0000-0000-0000-000000000000"  # QEMU without -uuid
    # keep: from QEMU's BLOCK_IO_ERROR to QEMU's RESUME, to the microsecond.
    k = by_vm["keep"]
    errors = stamps(keep_events, "BLOCK_IO_ERROR")
    assert k["outcome"] == "recovered" and k["io_error_events"] == len(errors) >= 1
    assert abs(k["start"] - errors[0]) < 1e-6
    assert abs(k["end"] - stamps(keep_events, "RESUME")[0]) < 1e-6
    # gone: from QEMU's BLOCK_IO_ERROR to when its death was noticed (QEMU said nothing).
    g = by_vm["gone"]
    errors = stamps(gone_events, "BLOCK_IO_ERROR")
    assert g["outcome"] == "vm_gone" and g["io_error_events"] == len(errors) >= 1
    assert abs(g["start"] - errors[0]) < 1e-6
    assert killed <= g["end"] <= detected

    async with aiohttp.ClientSession() as s, s.get(exp.url + "/api/v1/incidents") as r:
        assert r.status == 200
        [incident] = (await r.json())["incidents"]
    assert incident["backend"] == backend
    assert (incident["start"], incident["end"]) == (min(g["start"], k["start"]), max(g["end"], k["end"]))
    assert {k: incident[k] for k in ("disks", "vms", "recovered", "timed_out", "vm_gone")} == {
        "disks": 2,
        "vms": 2,
        "recovered": 1,
        "timed_out": 0,
        "vm_gone": 1,
    }
    assert incident["guests_saw_errors"] == []  # the stop policy: no guest saw an error


async def _lines(path: Path, n: int) -> list[dict[str, Any]] | None:
    got = journal_lines(path)
    return got if len(got) >= n else None
