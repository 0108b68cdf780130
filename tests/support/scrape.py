"""Reading a /metrics page: one parser, and a fast path for multi-megabyte pages.

`Metrics` parses the whole page with prometheus_client's parser (types, escaping, every
sample) and is what tests use.  The functions below it read sample lines by prefix without
building objects: a benchmark's page at 1,000 VMs is ~9 MB, and parsing it fully takes longer
than the scrape being measured.  They rely on the exposition's one sample per line, labels
sorted, ``name{labels} value``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


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

    def sum(self, name: str, **labels: str) -> float:
        """The sum over every matching sample (0 when there is none)."""
        return sum(s.value for s in self.find(name, **labels))

    def label_values(self, name: str, label: str, **labels: str) -> set[str]:
        return {s.labels[label] for s in self.find(name, **labels) if label in s.labels}


# --- the fast path ----------------------------------------------------------------------------


def sample_lines(text: str, name: str) -> list[tuple[str, float]]:
    """(series, value) of every sample of ``name`` that has labels (``name{...} value``)."""
    prefix = name + "{"
    out = []
    for line in text.splitlines():
        if line.startswith(prefix):
            series, _, value = line.rpartition(" ")
            out.append((series, float(value)))
    return out


def total(text: str, name: str) -> float:
    """Sum of every labelled sample of ``name``."""
    return sum(v for _s, v in sample_lines(text, name))


def count_equal(text: str, name: str, value: float) -> int:
    """How many labelled samples of ``name`` have ``value``."""
    return sum(1 for _s, v in sample_lines(text, name) if v == value)


def series_count(text: str) -> int:
    """Sample lines on the page (comments and blank lines left out)."""
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def parse_series(series: str) -> tuple[str, list[tuple[str, str]]]:
    """``name{a="x",b="y"}`` -> (name, [(a, x), (b, y)]), label values left escaped."""
    name, brace, rest = series.partition("{")
    labels: list[tuple[str, str]] = []
    body = rest[:-1] if brace else ""
    while body:
        k, _, body = body.partition('="')
        end = 0
        while True:  # the closing quote, skipping escaped ones
            end = body.index('"', end)
            if body[end - 1] != "\\":
                break
            end += 1
        labels.append((k, body[:end]))
        body = body[end + 1 :].lstrip(",")
    return name, labels


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample of ``name`` with exactly ``labels``, None when there is none."""
    for series, value in sample_lines(text, name):
        if dict(parse_series(series)[1]) == labels:
            return value
    return None
