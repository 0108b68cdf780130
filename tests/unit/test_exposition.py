"""The cached exposition path against prometheus_client: family headers, and which encoder
answers which Accept header."""

from __future__ import annotations

import pytest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder

from bench.prometheus import PROMETHEUS_2_ACCEPT, PROMETHEUS_3_ACCEPT
from exporter.exposition.formats import (
    OPENMETRICS,
    TEXT,
    Format,
    family_header,
    format_families,
    generate_openmetrics,
    generate_text,
)
from exporter.web.server import negotiate

DOCS = ("Plain.", 'Quoted "x", back\\slash and\nnewline.', "")
TYPES = ("counter", "gauge", "histogram", "summary", "info", "stateset", "gaugehistogram", "unknown")


@pytest.mark.parametrize("fmt", [TEXT, OPENMETRICS])
@pytest.mark.parametrize("typ", TYPES)
@pytest.mark.parametrize("doc", DOCS)
@pytest.mark.parametrize("unit", ["", "seconds"])
def test_family_header_is_what_the_encoder_writes(fmt: Format, typ: str, doc: str, unit: str) -> None:
    """HELP escaping differs (OpenMetrics escapes quotes), counters are renamed in the text
    format only, ``# UNIT`` exists only in OpenMetrics: an empty family is its header alone."""
    name = "qemu_x_seconds" if unit else "qemu_x"
    metric = Metric(name, doc, typ, unit)
    assert family_header(name, doc, typ, fmt, unit) == format_families([metric], fmt)


@pytest.mark.parametrize(
    ("accept", "ours"),
    [
        (PROMETHEUS_2_ACCEPT, generate_openmetrics),
        (PROMETHEUS_3_ACCEPT, generate_openmetrics),
        ("", generate_text),
        ("text/plain;version=1.0.0", generate_text),
        ("application/openmetrics-text;version=0.0.1,text/plain;version=0.0.4", generate_text),
    ],
)
def test_prometheus_gets_the_cached_path(accept: str, ours: object) -> None:
    """What Prometheus 2.x and 3.x ask for is served by the cached encoders, with
    prometheus_client's Content-Type (byte equality: tests/sim/test_bench_smoke.py)."""
    encoder, content_type = negotiate(accept)
    assert getattr(encoder, "func", encoder) is ours
    assert content_type == choose_encoder(accept)[1]


def test_an_uncomparable_version_is_answered_in_the_default_format() -> None:
    """prometheus_client's `choose_encoder` raises TypeError on ``version=1.0.0a`` (its servers
    answer 500); the exporter answers as if no Accept header had been sent."""
    accept = "application/openmetrics-text;version=1.0.0a"
    with pytest.raises(TypeError):
        choose_encoder(accept)
    assert negotiate(accept) == (generate_text, CONTENT_TYPE_PLAIN_0_0_4)


def test_every_metric_is_declared_once_in_metrics_py() -> None:
    """Each family is spelled in exactly one place in `exporter/`: its `Family` declaration
    (issue 15).  A second spelling (a hand-written line, a copied collector) could drift."""
    import ast
    import re
    from pathlib import Path

    import exporter.metrics as m

    declared = [v.name for v in vars(m).values() if isinstance(v, m.Family)]
    declared += [family.name for family, _attr in m.BLOCKSTATS]
    assert len(declared) == len(set(declared))
    names = set(declared) | {m.Family(n, "", "counter", m.Scope.HOST).sample_name for n in declared}
    root = Path(m.__file__).parent
    spelled: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for word in re.findall(r"\bqemu_\w+", node.value):
                    if word in names:
                        spelled.setdefault(word, []).append(f"{path.relative_to(root)}:{node.lineno}")
    assert {name: where for name, where in spelled.items() if len(where) > 1} == {}
    assert all(spelled[name][0].startswith("metrics.py:") for name in declared)
