"""The two exposition formats, byte for byte as prometheus_client writes them, and the registry
that asks collectors for their own text.

prometheus_client formats every sample of every scrape (~3 us each: 110,000 series at 1000
VMs x 4 disks took ~0.5 s in the text format, 1.2-2.1 s in OpenMetrics); the cached text of
`exporter.exposition.cache` takes 4-5 ms in-process.  Both are byte-equal
(tests/sim/test_bench_smoke.py, for 17 Accept headers) because the sample lines are
the same in both formats for every family rendered per VM (checked against prometheus_client
0.26's two encoders: both write ``name{labels} floatToGoString(value)``, labels sorted, values
escaped alike; no ``_created`` sample, no timestamp, no exemplar).  Only headers
(`family_header`), host-wide families (formatted by prometheus_client at each scrape) and
OpenMetrics' ``# EOF`` differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from prometheus_client.core import (
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.exposition import (
    ALLOWUTF8,
    UNDERSCORES,
    escape_label_name,
    escape_metric_name,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from exporter.metrics import (
    COLLECTOR_DURATION,
)

if TYPE_CHECKING:
    pass


# --- the exposition formats ----------------------------------------------------------------

#: The two exposition formats.
Format = Literal["text", "openmetrics"]
TEXT: Format = "text"
OPENMETRICS: Format = "openmetrics"

#: Escaping schemes for which the cached lines are exact.  Every metric and label name the
#: exporter writes is a legacy Prometheus name (fixed names; static label names are checked by
#: `exporter.config.check_label_name`), which these two schemes leave as they are.  ``dots``
#: doubles every underscore, and prometheus_client's OpenMetrics encoder prefixes sample names
#: with ``U__`` under ``values``: those go through prometheus_client itself.
_CACHED_ESCAPINGS = frozenset({UNDERSCORES, ALLOWUTF8})
_EOF = "# EOF\n"


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def format_families(families: Iterable[Metric], fmt: Format = TEXT) -> str:
    """Families exactly as prometheus_client's encoder of ``fmt`` writes them (without the
    OpenMetrics ``# EOF``, which ends the whole page)."""
    if fmt == OPENMETRICS:
        page: bytes = openmetrics.generate_latest(_Families(families))  # type: ignore[no-untyped-call]
        return page.decode("utf-8")[: -len(_EOF)]
    return generate_latest(_Families(families)).decode("utf-8")


@runtime_checkable
class Rendered(Protocol):
    """A collector that writes its own exposition text (faster than its `collect`)."""

    def collect(self) -> Iterable[Metric]: ...

    def render(self, fmt: Format) -> list[str]:
        """Exactly what prometheus_client's encoder of ``fmt`` writes for `collect`."""
        ...


@runtime_checkable
class SelfTimed(Protocol):
    """A collector serving several of `exporter.model.collectors`, which times each itself."""

    durations: dict[str, float]


class Registry(CollectorRegistry):
    """A prometheus_client registry that remembers its collectors in order, so that
    `generate_text` and `generate_openmetrics` can ask those that render their own text, and
    times each by the name of the collector (`exporter.model.collectors`) it serves
    (`DurationCollector` shows the times)."""

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self.collectors: list[Collector] = []
        self._names: dict[int, str] = {}
        #: Seconds per collector name, of the page being generated (or the last one).
        self.durations: dict[str, float] = {}

    def register(self, collector: Collector, name: str = "") -> None:
        """Register ``collector``; with ``name``, its time counts as that collector's."""
        super().register(collector)
        self.collectors.append(collector)
        if name:
            self._names[id(collector)] = name

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self.collectors.remove(collector)
        self._names.pop(id(collector), None)

    def _timed(self, collector: Collector, start: float) -> None:
        if isinstance(collector, SelfTimed):
            self.durations.update(collector.durations)
        elif (name := self._names.get(id(collector))) is not None:
            self.durations[name] = self.durations.get(name, 0.0) + perf_counter() - start

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's `collect` (what its encoders read), each collector timed."""
        self.durations = {}
        for collector in list(self.collectors):
            start = perf_counter()
            metrics = list(collector.collect())
            self._timed(collector, start)
            yield from metrics


def _generate(registry: Registry, fmt: Format) -> list[str]:
    out: list[str] = []
    registry.durations = {}
    for collector in registry.collectors:
        start = perf_counter()
        if isinstance(collector, Rendered):
            out.extend(collector.render(fmt))
        else:
            out.append(format_families(collector.collect(), fmt))
        registry._timed(collector, start)
    return out


def generate_text(registry: Collector, escaping: str = UNDERSCORES) -> bytes:
    """Byte for byte `prometheus_client.exposition.generate_latest(registry, escaping)`."""
    if not isinstance(registry, Registry) or escaping not in _CACHED_ESCAPINGS:
        return generate_latest(registry, escaping)
    return "".join(_generate(registry, TEXT)).encode("utf-8")


def generate_openmetrics(registry: Collector, escaping: str = UNDERSCORES, version: str = "1.0.0") -> bytes:
    """Byte for byte `prometheus_client.openmetrics.exposition.generate_latest(registry,
    escaping, version)`, from the same cached lines as `generate_text`.

    Prometheus asks for OpenMetrics first (2.x and 3.x alike); prometheus_client's encoder took
    1.2-2.1 s per scrape (p50) at 1000 VMs x 4 disks, this path what the text path costs
    (docs/performance-history.md).  ``version`` only decides whether prometheus_client writes native
    histogram samples (>= 2.0.0), which none of our families has; it is passed on to the
    encoder for the families it formats."""
    if not isinstance(registry, Registry) or escaping not in _CACHED_ESCAPINGS:
        page: bytes = openmetrics.generate_latest(registry, escaping, version)  # type: ignore[no-untyped-call]
        return page
    out = _generate(registry, OPENMETRICS)
    out.append(_EOF)
    return "".join(out).encode("utf-8")


def family_header(name: str, documentation: str, typ: str, fmt: Format = TEXT, unit: str = "") -> str:
    """``# HELP``/``# TYPE`` (and ``# UNIT``) lines as prometheus_client's encoder of ``fmt``
    writes them: the text format renames counters to ``_total`` (and info/stateset/unknown
    types), OpenMetrics keeps the family name, escapes ``"`` in HELP too, and writes the unit."""
    if fmt == OPENMETRICS:
        name = escape_metric_name(name, UNDERSCORES)
        doc = _escape_value(documentation)
        unit_line = f"# UNIT {name} {unit}\n" if unit else ""
        return f"# HELP {name} {doc}\n# TYPE {name} {typ}\n{unit_line}"
    if typ == "counter":
        name += "_total"
    elif typ == "info":
        name, typ = name + "_info", "gauge"
    elif typ == "stateset":
        typ = "gauge"
    elif typ == "gaugehistogram":
        typ = "histogram"
    elif typ == "unknown":
        typ = "untyped"
    name = escape_metric_name(name, UNDERSCORES)
    doc = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {typ}\n"


def _escape_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_text(names: Sequence[str], values: Sequence[str]) -> str:
    """``{a="x",b="y"}`` as generate_latest writes a sample's labels (sorted by name)."""
    labels = dict(zip(names, values, strict=False))
    if not labels:
        return ""
    inner = ",".join(
        f'{escape_label_name(k, UNDERSCORES)}="{_escape_value(v)}"' for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


def fmt_value(v: float) -> str:
    """A sample value as generate_latest writes it."""
    if v == 1:
        return "1.0"
    if v == 0 and math.copysign(1.0, v) == 1.0:
        return "0.0"
    text: str = floatToGoString(v)  # type: ignore[no-untyped-call]
    return text


class DurationCollector:
    """`COLLECTOR_DURATION`: what this scrape spent per collector, as `Registry` measured it (registered last, so that it sees every other collector's time)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> list[Metric]:
        d = self._registry.durations
        return [COLLECTOR_DURATION.metric(COLLECTOR_DURATION.labels, [((n,), d[n]) for n in sorted(d)])]
