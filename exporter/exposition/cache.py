"""Every per-VM metric as exposition text, cached per VM and per part of its state.

`ExporterCollector.render` turns the model's samples (`exporter.metrics`) into lines with
`_Lines`, re-renders a VM's lines only when the part of its state they show changed
(`VMState.changed`, `HangTracking.version`), and joins the cached lines family by family;
`ExporterCollector.collect` gives the same samples to prometheus_client (the reference, and the
path of the rarely used ``dots`` and ``values`` escapings).  At 1000 VMs x 4 disks a scrape at
rest takes 11-18 ms over HTTP (`bench.render`, `bench.fleet`; docs/performance.md).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from itertools import chain
from operator import itemgetter
from time import perf_counter
from typing import TYPE_CHECKING

from prometheus_client.core import (
    Metric,
)

from exporter import __version__
from exporter.exposition.formats import (
    OPENMETRICS,
    TEXT,
    Format,
    family_header,
    fmt_value,
    format_families,
    label_text,
)
from exporter.exposition.host import (
    HangSource,
    backend_metrics,
    build_info_metric,
    histogram_metric,
)
from exporter.metrics import (
    HANG_COLLECTORS,
    HANG_FAMILIES,
    HANG_STEADY,
    HANG_TIMED,
    PAGE_SPLIT,
    READERS,
    VMS,
    Family,
    Reader,
    Sample,
    hang_timed,
)
from exporter.model.collectors import COLLECTORS
from exporter.model.sink import EventSink
from exporter.model.state import VMState

if TYPE_CHECKING:
    pass


#: Where each per-VM family's lines sit in `_VMText.text` (a list: joining a page reads 35
#: families x 1000 VMs of it, at C speed with `operator.itemgetter`).
_SLOT: dict[Family, int] = {
    family: i for i, family in enumerate((*(f for r in READERS for f in r.families), *HANG_FAMILIES))
}
_HANG_STEADY_SLOTS = tuple(tuple(_SLOT[f] for f in families) for families, _key, _reader in HANG_STEADY)
_HANG_TIMED_SLOTS = tuple(_SLOT[f] for f in HANG_TIMED)


class _Lines:
    """Turns one VM's samples into exposition lines.  Label text is kept per (label names,
    values) for as long as the VM's identity (its ``vm`` and static labels) stays: a hanging
    disk's lines are rendered at every scrape, its labels once."""

    __slots__ = ("_base_names", "_base_values", "_labels")

    def __init__(self, base_names: Sequence[str], base_values: Sequence[str]) -> None:
        self._base_names = base_names
        self._base_values = base_values
        self._labels: dict[tuple[str, tuple[str, ...]], str] = {}

    def render(self, samples: Iterable[Sample]) -> dict[Family, str]:
        """The lines of each family of ``samples`` (in sample order)."""
        lines: dict[Family, list[str]] = {}
        cache = self._labels
        for family, values, value in samples:
            key = (family.label_key, values)
            text = cache.get(key)
            if text is None:
                names = family.label_names(self._base_names)
                text = cache[key] = label_text(names, [*self._base_values, *values])
            line = f"{family.sample_name}{text} {fmt_value(value)}\n"
            got = lines.get(family)
            if got is None:
                lines[family] = [line]
            else:
                got.append(line)
        return {family: "".join(got) for family, got in lines.items()}


@dataclass(frozen=True, slots=True)
class _Refresh:
    """One enabled reader, as `_VMText.refresh` runs it."""

    collector: str
    version_attr: str
    slots: tuple[int, ...]
    read: Callable[[VMState], Iterator[Sample]]


def _plan(readers: Iterable[Reader]) -> tuple[_Refresh, ...]:
    return tuple(
        _Refresh(r.collector, VMState.version_attr(r.part), tuple(_SLOT[f] for f in r.families), r.read)
        for r in readers
    )


class _VMText:
    """One VM's cached lines per family (`_SLOT`), and the versions of its state they show."""

    __slots__ = ("hang_key", "hang_state", "hang_volatile", "identity", "lines", "text", "versions", "vm")

    def __init__(
        self, vm: VMState, base_names: Sequence[str], base_values: Sequence[str], readers: int
    ) -> None:
        self.vm = vm
        #: The version of the VM's identity (its labels) this entry was made for.
        self.identity = vm.version
        self.lines = _Lines(base_names, base_values)
        self.text: list[str] = [""] * len(_SLOT)
        #: Per enabled reader, the version of the VM's state its lines show.
        self.versions: list[int] = [-1] * readers
        self.hang_key: object = None
        self.hang_volatile = False
        #: Per group of `HANG_STEADY`, the keys of the disks its lines show.
        self.hang_state: list[list[object] | None] = [None] * len(HANG_STEADY)

    def refresh(self, plan: Sequence[_Refresh], durations: dict[str, float] | None = None) -> None:
        """Re-render each reader's lines whose part of the VM moved, adding the time to its
        collector's in ``durations``.  (A new identity gets a new `_VMText`: its label text may
        have changed.)"""
        vm, text, versions = self.vm, self.text, self.versions
        for i, step in enumerate(plan):
            version = getattr(vm, step.version_attr)
            if versions[i] != version:
                start = perf_counter()
                versions[i] = version
                for slot in step.slots:
                    text[slot] = ""
                for family, lines in self.lines.render(step.read(vm)).items():
                    text[_SLOT[family]] = lines
                if durations is not None:
                    durations[step.collector] += perf_counter() - start

    def refresh_hangs(self, hangs: HangSource, now: float) -> bool:
        """Re-render the hang lines when the VM or its trackers changed, or a disk hangs or
        fails (its duration grows).  Only the two `HANG_TIMED` lines change with time: the
        others are kept while the disks' states stay (in a storm, re-rendering 4000 hanging
        disks' every line was half of a scrape's CPU)."""
        vm = self.vm
        key = (vm.version, hangs.version(vm.key))
        if key == self.hang_key and not self.hang_volatile:
            return False  # idle: nothing shown of it depends on the passing time
        self.hang_key = key
        shown = hangs.shown(vm, now)
        self.hang_volatile = any(t.active for _dev, t in shown)
        text = self.text
        for group, (slots, (_families, key_of, reader)) in enumerate(
            zip(_HANG_STEADY_SLOTS, HANG_STEADY, strict=True)
        ):
            state = [key_of(t) for _dev, t in shown]
            if state != self.hang_state[group]:
                self.hang_state[group] = state
                for slot in slots:
                    text[slot] = ""
                for family, lines in self.lines.render(
                    chain.from_iterable(reader(d, t) for d, t in shown)
                ).items():
                    text[_SLOT[family]] = lines
        for slot in _HANG_TIMED_SLOTS:
            text[slot] = ""
        for family, lines in self.lines.render(
            chain.from_iterable(hang_timed(d, t, now) for d, t in shown)
        ).items():
            text[_SLOT[family]] = lines
        return True


class ExporterCollector(EventSink):
    """Every per-VM metric of the enabled collectors, from the current state of the watched
    VMs: `collect` for prometheus_client, `render` for the cached text (the same samples, the
    same bytes).  ``durations`` holds, after each, the time it spent per collector.

    As an `EventSink` it renders a VM's new blockstats right after each poll: every VM is
    polled every few seconds, so by the next scrape (15-60 s) all 4000 disks' blockstats of
    1000 VMs changed; formatted in the scrape that was ~150 ms, formatted poll by poll it is
    spread over the poll interval and the scrape only joins text."""

    def __init__(
        self,
        vms: Callable[[], Sequence[VMState]],
        static_label_names: Sequence[str] = (),
        *,
        hangs: HangSource | None = None,
        clock: Callable[[], float],
        collectors: Iterable[str] = COLLECTORS,
    ) -> None:
        self._vms = vms
        self._static = tuple(static_label_names)
        self._base_names = ["vm", *self._static]
        self._hangs = hangs
        self._clock = clock
        enabled = frozenset(collectors)
        readers = [r for r in READERS if r.collector in enabled]
        self._plan = _plan(readers)
        self._before = tuple(f for r in readers if r in READERS[:PAGE_SPLIT] for f in r.families)
        self._after = tuple(f for r in readers if r in READERS[PAGE_SPLIT:] for f in r.families)
        self._hang_families = tuple(f for f in HANG_FAMILIES if f.collector in enabled)
        self._show_hangs = hangs is not None and bool(enabled & HANG_COLLECTORS)
        #: The collector the hang view's own work counts for (`durations`).
        self._hang_timer = "hang" if "hang" in enabled else "hangtime"
        self._histogram = hangs is not None and "hang" in enabled
        self._backend = hangs is not None and "backend" in enabled
        #: The per-VM and per-host collectors this one serves (for `durations`).
        self.names = sorted(
            {r.collector for r in readers}
            | ({f.collector for f in self._hang_families} if self._show_hangs else set())
            | ({"backend"} if self._backend else set())
        )
        self.durations: dict[str, float] = {}
        self._build = (__version__, platform.python_version(), _dist_version("qemu.qmp"))
        self._cache: dict[int, _VMText] = {}
        self._backends: list[Metric] | None = None
        self._backend_keys: list[str] = []
        self._headers: dict[Format, dict[Family, str]] = {}
        self._build_text = {
            fmt: format_families([build_info_metric(self._build)], fmt) for fmt in (TEXT, OPENMETRICS)
        }

    def _base(self, vm: VMState) -> list[str]:
        return [vm.vm, *(vm.static_labels.get(k, "") for k in self._static)]

    def _sorted(self) -> list[VMState]:
        return sorted(self._vms(), key=lambda v: (v.vm, v.key))

    def _entry(self, vm: VMState, durations: dict[str, float] | None = None) -> _VMText:
        """``vm``'s cached text (a new one when its labels changed), parts brought up to date."""
        entry = self._cache.get(id(vm))
        if entry is None or entry.vm is not vm or entry.identity != vm.version:
            # A new identity may mean new label values: start from empty label text (an
            # id() of a VM that is gone may be reused, hence the `is` check).
            entry = _VMText(vm, self._base_names, self._base(vm), len(self._plan))
        entry.refresh(self._plan, durations)
        return entry

    def on_blockstats(self, vm: VMState, now: float) -> None:
        # Not the first sample of a session (vm.up is set after it): when a whole fleet
        # connects, the next scrape renders everything once anyway.
        if vm.up:
            self._cache[id(vm)] = self._entry(vm)

    def _backend_metrics(self, hangs: HangSource, shown: Sequence[VMState], recount: bool) -> list[Metric]:
        """The per-backend counts.  They depend on exactly what re-renders a VM's hang lines
        (its disks, its trackers, its hanging or failing disks) and on which VMs are shown:
        recounted only then, not over all 4000 disks of an idle host at every scrape (~2.5 ms
        at 1000 VMs)."""
        keys = [vm.key for vm in shown]
        if recount or self._backends is None or keys != self._backend_keys:
            self._backends = backend_metrics(hangs.backend_counts(shown))
            self._backend_keys = keys
        return self._backends

    def _join(
        self, parts: list[str], h: dict[Family, str], families: Iterable[Family], texts: list[list[str]]
    ) -> None:
        durations = self.durations
        for family in families:
            start = perf_counter()
            parts.append(h[family])
            parts.extend(map(itemgetter(_SLOT[family]), texts))
            durations[family.collector] += perf_counter() - start

    def render(self, fmt: Format) -> list[str]:
        """The text of `collect` in ``fmt``, from per-VM lines re-rendered only for the parts
        of VMs that changed since the previous scrape (the lines serve both formats)."""
        self.durations = durations = dict.fromkeys(self.names, 0.0)
        vms = self._sorted()
        now = self._clock()
        h = self._headers.get(fmt)
        if h is None:
            h = self._headers[fmt] = {
                family: family_header(family.name, family.help, family.type, fmt) for family in _SLOT
            }
        entries = [self._entry(vm, durations) for vm in vms]
        self._cache = {id(e.vm): e for e in entries}  # the VMs gone drop out
        vms_line = f"{VMS.name} {fmt_value(len(vms))}\n"
        parts = [self._build_text[fmt], family_header(VMS.name, VMS.help, VMS.type, fmt), vms_line]
        texts = [e.text for e in entries]
        self._join(parts, h, self._before, texts)
        shown = [e for e in entries if e.vm.up]
        # Without the hang view nothing tells when the backend counts changed: counted each time.
        recount = not self._show_hangs
        if self._show_hangs:
            assert self._hangs is not None
            start = perf_counter()
            recount = any([e.refresh_hangs(self._hangs, now) for e in shown])
            durations[self._hang_timer] += perf_counter() - start
            self._join(parts, h, self._hang_families, [e.text for e in shown])
        if self._histogram:
            assert self._hangs is not None
            start = perf_counter()
            parts.append(format_families([histogram_metric(self._hangs.histogram)], fmt))
            durations["hang"] += perf_counter() - start
        if self._backend:
            assert self._hangs is not None
            start = perf_counter()
            backends = self._backend_metrics(self._hangs, [e.vm for e in shown], recount)
            parts.append(format_families(backends, fmt))
            durations["backend"] += perf_counter() - start
        self._join(parts, h, self._after, texts)
        return parts

    def collect(self) -> Iterator[Metric]:
        self.durations = durations = dict.fromkeys(self.names, 0.0)
        vms = self._sorted()
        now = self._clock()
        samples: dict[Family, list[tuple[list[str], float]]] = {family: [] for family in _SLOT}
        for step in self._plan:
            start = perf_counter()
            for vm in vms:
                base = self._base(vm)
                for family, values, value in step.read(vm):
                    samples[family].append(([*base, *values], value))
            durations[step.collector] += perf_counter() - start
        shown = [vm for vm in vms if vm.up]
        if self._show_hangs:
            assert self._hangs is not None
            start = perf_counter()
            for vm in shown:
                base = self._base(vm)
                for dev, t in self._hangs.shown(vm, now):
                    steady = (reader(dev, t) for _families, _key, reader in HANG_STEADY)
                    for family, values, value in chain(*steady, hang_timed(dev, t, now)):
                        samples[family].append(([*base, *values], value))
            durations[self._hang_timer] += perf_counter() - start

        def metric(family: Family) -> Metric:
            return family.metric(family.label_names(self._base_names), samples[family])

        yield build_info_metric(self._build)
        yield VMS.metric((), [((), len(vms))])
        yield from map(metric, self._before)
        if self._show_hangs:
            yield from map(metric, self._hang_families)
        if self._histogram:
            assert self._hangs is not None
            yield histogram_metric(self._hangs.histogram)
        if self._backend:
            assert self._hangs is not None
            start = perf_counter()
            backends = self._backend_metrics(self._hangs, shown, recount=True)
            durations["backend"] += perf_counter() - start
            yield from backends
        yield from map(metric, self._after)


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
