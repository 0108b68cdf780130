"""The simulator behaves like a real QEMU 7.2 in the scenarios both can play (stop and report
policies): the exporter, as a subprocess, shows the same series with the same policy, hang and
status values whether it watches the real QEMU or the simulator.

Each scenario runs first on a real QEMU (nbdkit storage that fails on demand, a boot-sector
guest doing continuous IO, tests/qemu/lab.py), then on a SimVM with the same disk (``link_down``
/ ``link_up`` for the storage).  On both sides a plain QMP client on a second monitor plays the
management layer (``cont``) and counts the events sent.  Compared: the normalised series sets
(machine-specific labels and blockstats values left out), the values of the policy, status and
hang metrics (durations within ±1 s), and on each side the exporter's event counts against
what that side sent (the counts themselves depend on the guest's speed).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from qmpsim import DiskSpec, SimVM
from tests.qemu.compare import series, series_set_diff, value_diff
from tests.qemu.lab import Lab, io_error_counts, nbd_disk_args, plain_qmp, wait_guest
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics
from tests.support.waits import wait_for

pytestmark = pytest.mark.qemu

VM = "confvm"
OUTAGE = 1.5  # seconds the storage stays down in the stop scenario

#: metrics whose values must be equal on both sides
SAME_VALUE = (
    "qemu_qmp_up",
    "qemu_vm_info",
    "qemu_vm_retry_feature",
    "qemu_vm_status",
    "qemu_block_device_info",
    "qemu_block_retry_policy_ok",
    "qemu_block_retry_policy_violation",
    "qemu_block_io_hang",
    "qemu_block_io_failing",
    "qemu_block_io_hangs_total",
    "qemu_block_io_hang_completed_duration_seconds_count",
    "qemu_exporter_vms",
    "qemu_exporter_io_error_events_unmatched_total",
    "qemu_exporter_internal_errors_total",
)
#: durations: equal within the timing tolerance
DURATIONS = (
    "qemu_block_io_hang_duration_seconds",
    "qemu_block_io_hang_seconds_total",
    "qemu_block_io_hang_completed_duration_seconds_sum",
)
TOLERANCE = dict.fromkeys(DURATIONS, 1.0)


@dataclass
class Run:
    """What one side of a scenario produced."""

    side: str
    during: Metrics | None = None  # scraped while the storage is down
    after: Metrics | None = None  # scraped once IO succeeds again
    sent: Counter[tuple[str, str]] = field(default_factory=Counter)  # BLOCK_IO_ERROR (op, action)
    others: Counter[str] = field(default_factory=Counter)  # other events by name
    outage: float = 0.0  # seconds between the storage failing and the cont that worked
    t_fail: float = 0.0


@dataclass
class Target:
    """One side: where the exporter and the management client connect, how the storage fails
    and recovers, and how to tell that the guest does IO (again)."""

    side: str
    watched: Path
    mgmt: Path
    fail: Callable[[], None]
    recover: Callable[[], None]
    io_ok: Callable[[], Awaitable[object]]
    io_failing: Callable[[], Awaitable[object]]
    io_recovered: Callable[[], Awaitable[object]]


async def exporter_for(lab: Lab, target: Target, device: str) -> ExporterProcess:
    exp = await lab.exporter(target.watched)
    await exp.wait_metrics(
        lambda m: (
            m.value("qemu_qmp_up", vm=VM) == 1 and bool(m.find("qemu_block_device_info", device=device))
        ),
        timeout=15,
        what=f"{target.side}: exporter watching the disk",
    )
    return exp


def record_events(run: Run, client: QMPClient) -> None:
    for event in client.events.clear():
        if event["event"] == "BLOCK_IO_ERROR":
            data = event["data"]
            assert (data["device"], data["node-name"]) == ("", "nbd0"), data
            run.sent[(data["operation"], data["action"])] += 1
        else:
            run.others[event["event"]] += 1


def stop_events(m: Metrics, device: str) -> int:
    return sum(n for (_op, action), n in io_error_counts(m, VM, device).items() if action == "stop")


async def stop_scenario(lab: Lab, target: Target, device: str) -> Run:
    """tests/qemu/test_stop_policy.py: storage down -> STOP/io-error and a hang; storage back,
    ``cont`` -> RESUME and the hang ends recovered with the outage's duration."""
    run = Run(target.side)
    exp = await exporter_for(lab, target, device)
    async with plain_qmp(target.mgmt, "mgmt") as mgmt:
        await target.io_ok()
        mgmt.events.clear()
        run.t_fail = time.time()
        target.fail()
        await exp.wait_metrics(
            lambda m: (
                m.value("qemu_vm_status", vm=VM, status="io-error") == 1 and stop_events(m, device) >= 1
            ),
            timeout=15,
            what=f"{target.side}: VM paused on the IO error",
        )
        run.during = await exp.wait_metrics(
            lambda m: (m.value("qemu_block_io_hang_duration_seconds", vm=VM, device=device) or 0) >= OUTAGE,
            timeout=15,
            what=f"{target.side}: the hang shown during the outage",
        )
        assert (await mgmt.execute("query-status"))["status"] == "io-error"  # type: ignore[index]
        target.recover()
        run.outage = time.time() - run.t_fail
        await mgmt.execute("cont")
        await target.io_recovered()
        run.after = await exp.wait_metrics(
            lambda m: (
                m.value("qemu_block_io_hangs_total", vm=VM, device=device, outcome="recovered") == 1
                and m.value("qemu_block_io_hang", vm=VM, device=device) == 0
                and m.value("qemu_vm_status", vm=VM, status="running") == 1
            ),
            timeout=10,
            what=f"{target.side}: the hang to end recovered",
        )
        await mgmt.execute("query-status")  # every earlier event is in the listener now
        record_events(run, mgmt)
    exp.stop()  # now: it would otherwise keep watching while the other side runs
    return run


async def report_scenario(lab: Lab, target: Target, device: str) -> Run:
    """tests/qemu/test_error_counting.py: report policy, the storage fails for a while; the
    exporter's counts equal the events QEMU sent."""
    run = Run(target.side)
    exp = await exporter_for(lab, target, device)
    await target.io_ok()
    async with plain_qmp(target.mgmt, "observer") as observer:
        observer.events.clear()
        run.t_fail = time.time()
        target.fail()
        await target.io_failing()
        run.during = await exp.wait_metrics(
            lambda m: m.value("qemu_block_io_failing", vm=VM, device=device) == 1,
            timeout=10,
            what=f"{target.side}: disk shown failing",
        )
        target.recover()
        await target.io_recovered()
        await observer.execute("query-status")
        record_events(run, observer)

    async def settled() -> Metrics:
        m = await exp.scrape()
        got = io_error_counts(m, VM, device)
        assert got == run.sent, f"{target.side}: exporter {dict(got)} != sent {dict(run.sent)}"
        assert m.value("qemu_block_io_failing", vm=VM, device=device) == 0
        return m

    run.after = await wait_for(settled, timeout=10, what=f"{target.side}: exporter counts to settle")
    exp.stop()
    return run


# --- the two sides ---------------------------------------------------------------------------


def real_target(lab: Lab, device: str, policy: str, kind: str) -> Target:
    storage = lab.storage()
    vm = lab.vm(nbd_disk_args(storage, device, policy, kind), name=VM)
    assert vm.mon2 is not None
    marks: dict[str, int] = {}

    async def io_ok() -> object:
        return await wait_guest(vm, lambda s: "WRWR" in s, what="real: guest doing IO")

    async def io_failing() -> object:
        return await wait_guest(
            vm, lambda s: s.count("w") >= 20 and s.count("r") >= 20, what="real: IO failing"
        )

    def recover() -> None:
        marks["recovered_at"] = len(vm.debug_output())
        storage.recover()

    def recovered(_status: str) -> bool:
        tail = vm.debug_output()[marks["recovered_at"] :]
        return "WRWR" in tail[max(tail.rfind("w"), tail.rfind("r")) + 1 :]

    async def io_recovered() -> object:
        return await wait_guest(vm, recovered, what="real: guest IO succeeds again")

    return Target("real", vm.qmp, vm.mon2, storage.fail, recover, io_ok, io_failing, io_recovered)


async def sim_target(d: Path, vm: SimVM, device: str, operations: tuple[str, ...]) -> Target:
    """``vm`` must have the extra sockets ``sim-mgmt.qmp`` and ``sim-probe.qmp`` in ``d``."""

    async def blockstats_ops() -> dict[str, int]:
        async with plain_qmp(d / "sim-probe.qmp", "probe") as probe:
            (entry,) = await probe.execute("query-blockstats")  # type: ignore[misc]
        return {"read": entry["stats"]["rd_operations"], "write": entry["stats"]["wr_operations"]}

    async def io_ok() -> object:
        before = await blockstats_ops()

        async def grown() -> bool:
            now = await blockstats_ops()
            return all(now[op] > before[op] for op in operations)

        return await wait_for(grown, timeout=10, what="sim: guest IO succeeds")

    async def io_failing() -> object:
        async def enough() -> bool:
            return all(vm.event_count("BLOCK_IO_ERROR", operation=op) >= 20 for op in operations)

        return await wait_for(enough, timeout=10, what="sim: IO failing")

    return Target(
        "sim",
        Path(vm.socket_path),
        d / "sim-mgmt.qmp",
        lambda: vm.link_down(device),
        lambda: vm.link_up(device),
        io_ok,
        io_failing,
        io_ok,
    )


def sim_vm(d: Path, device: str, kind: str, policy: str, operations: tuple[str, ...]) -> SimVM:
    """A SimVM like the lab's QEMU: upstream 7.2, the nbd boot disk on ``-blockdev`` (node
    ``nbd0``, NBD over a unix socket, as QEMU names it), one request per operation in flight."""
    werror, rerror = (kv.split("=")[1] for kv in policy.split(","))
    disk = DiskSpec(
        id=device, type=kind, werror=werror, rerror=rerror, naming="blockdev", node_name="nbd0",
        in_flight=1, operations=operations, filename=f"nbd+unix://?socket={d / 'nbd.sock'}",
    )  # fmt: skip
    return SimVM(
        str(d / "sim.qmp"),
        name=VM,
        retry_feature=False,
        disks=[disk],
        extra_sockets=[str(d / "sim-mgmt.qmp"), str(d / "sim-probe.qmp")],
    )


# --- comparison ------------------------------------------------------------------------------


def compare(real: Run, sim: Run) -> None:
    diffs: list[str] = []
    for phase in ("during", "after"):
        r, s = getattr(real, phase), getattr(sim, phase)
        assert r is not None and s is not None
        d = series_set_diff(r, s)
        if d:
            diffs.append(f"series sets differ {phase} the outage:\n{d}")
        diffs += [f"{phase}: {x}" for x in value_diff(r, s, SAME_VALUE, TOLERANCE)]
        diffs += [f"{phase}: {x}" for x in value_diff(r, s, DURATIONS, TOLERANCE) if "no series" not in x]
        # other events (STOP, RESUME) as counted by the exporter
        names = [
            k
            for k in series(r)
            if k.startswith("qemu_exporter_qmp_events_total") and "BLOCK_IO_ERROR" not in k
        ]
        diffs += [
            f"{phase}: {k}: QEMU {series(r)[k]} != qmpsim {series(s).get(k)}"
            for k in names
            if series(r)[k] != series(s).get(k)
        ]
    assert real.others == sim.others, (real.others, sim.others)
    assert not diffs, "\n".join(diffs)


async def test_stop_policy_real_and_sim(lab: Lab, short_tmp: Path) -> None:
    device, kind, policy = "virtio-disk0", "virtio-blk", "werror=stop,rerror=stop"
    real = await stop_scenario(lab, real_target(lab, device, policy, kind), device)
    # one request was in flight: fail the same operation on the simulator
    ((op, action),) = real.sent
    assert (action, real.sent[(op, action)]) == ("stop", 1), real.sent
    async with sim_vm(short_tmp, device, kind, policy, (op,)) as vm:
        sim = await stop_scenario(lab, await sim_target(short_tmp, vm, device, (op,)), device)
    for run in (real, sim):
        assert run.sent == Counter({(op, "stop"): 1}), (run.side, run.sent)
        assert run.others == Counter({"STOP": 1, "RESUME": 1}), (run.side, run.others)
        assert run.after is not None and run.during is not None
        assert io_error_counts(run.after, VM, device) == run.sent, run.side
        start = run.during.value("qemu_block_io_hang_start_timestamp_seconds", vm=VM, device=device)
        assert start is not None and run.t_fail - 0.1 <= start <= run.t_fail + 1.0, (
            run.side,
            start,
            run.t_fail,
        )
        duration = run.after.value("qemu_block_io_hang_seconds_total", vm=VM, device=device)
        assert duration is not None and abs(duration - run.outage) <= 1.0, (run.side, duration, run.outage)
    compare(real, sim)


@pytest.mark.parametrize(("kind", "device"), [("virtio-blk", "virtio-disk0"), ("scsi-hd", "scsi0-0-0-0")])
async def test_report_policy_real_and_sim(lab: Lab, short_tmp: Path, kind: str, device: str) -> None:
    policy, ops = "werror=report,rerror=report", ("write", "read")
    real = await report_scenario(lab, real_target(lab, device, policy, kind), device)
    async with sim_vm(short_tmp, device, kind, policy, ops) as vm:
        sim = await report_scenario(lab, await sim_target(short_tmp, vm, device, ops), device)
        # the simulator's own count of what reached the exporter's monitor
        for (op, action), n in sim.sent.items():
            assert vm.event_count("BLOCK_IO_ERROR", operation=op, action=action, socket=vm.socket_path) == n
    for run in (real, sim):
        assert set(run.sent) == {("write", "report"), ("read", "report")}, (run.side, run.sent)
        assert min(run.sent.values()) >= 20, (run.side, run.sent)
        assert run.after is not None
        assert io_error_counts(run.after, VM, device) == run.sent, run.side
    compare(real, sim)


def test_series_helpers_show_differences() -> None:
    """The normalised series drop machine-specific labels; differences print as a diff."""
    real = Metrics(
        'qemu_vm_info{vm="a",qemu_version="7.2.22",uuid="u1"} 1\n'
        'qemu_block_io_hang{vm="a",device="d"} 1\n'
        'qemu_block_io_hang_seconds_total{vm="a",device="d"} 2.0\n'
    )
    sim = Metrics(
        'qemu_vm_info{vm="a",qemu_version="7.2.0",uuid="u2"} 1\n'
        'qemu_block_io_hang{vm="a",device="d"} 0\n'
        'qemu_block_io_hang_seconds_total{vm="a",device="d"} 3.5\n'
        'qemu_block_io_failing{vm="a",device="d"} 0\n'
    )
    assert series(real)['qemu_vm_info{vm="a"}'] == 1
    assert series_set_diff(real, sim).splitlines()[2:] == [
        "@@ -0,0 +1 @@",
        '+qemu_block_io_failing{device="d",vm="a"}',
    ]
    assert value_diff(real, sim, ["qemu_vm_info", "qemu_block_io_hang"]) == [
        'qemu_block_io_hang{device="d",vm="a"}: QEMU 1.0 != qmpsim 0.0'
    ]
    assert value_diff(real, sim, DURATIONS[1:2], TOLERANCE) == [
        'qemu_block_io_hang_seconds_total{device="d",vm="a"}: QEMU 2.0 != qmpsim 3.5'
    ]
