"""Comparing a real QEMU with the simulator: JSON by shape, /metrics by normalised series.

Every helper returns a list of human-readable differences (empty: conformant), so an assertion
failure prints exactly what differs and where.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Collection, Iterable
from typing import Any

from tests.support.scrape import Metrics

#: what ends every line QEMU sends
QMP_TERMINATOR = b"\r\n"


def _kind(value: Any) -> str:
    """The JSON type of ``value`` (bool is not a number)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _matches(path: str, patterns: Collection[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def shape_diff(real: Any, sim: Any, exact: Collection[str] = (), path: str = "$") -> list[str]:
    """Differences between ``real`` and ``sim`` by shape: the same keys at every level and the
    same JSON types, recursively; lists element-wise when their lengths match, else every
    element of one against the first of the other.  Values at paths matching one of the
    ``exact`` glob patterns (``$/0/device``, ``$/*/qdev``, ...) must be equal."""
    if _matches(path, exact) and real != sim:
        return [f"{path}: QEMU {real!r} != qmpsim {sim!r}"]
    kr, ks = _kind(real), _kind(sim)
    if kr != ks:
        return [f"{path}: QEMU has {kr} {real!r}, qmpsim has {ks} {sim!r}"]
    out: list[str] = []
    if kr == "object":
        for key in sorted(set(real) - set(sim)):
            out.append(f"{path}/{key}: only in QEMU ({real[key]!r})")
        for key in sorted(set(sim) - set(real)):
            out.append(f"{path}/{key}: only in qmpsim ({sim[key]!r})")
        for key in sorted(set(real) & set(sim)):
            out += shape_diff(real[key], sim[key], exact, f"{path}/{key}")
    elif kr == "array":
        if len(real) == len(sim):
            for i, (r, s) in enumerate(zip(real, sim, strict=True)):
                out += shape_diff(r, s, exact, f"{path}/{i}")
        else:
            if _matches(f"{path}/#", exact):
                out.append(f"{path}: QEMU has {len(real)} elements, qmpsim {len(sim)}")
            if real and sim:
                out += [d for s in sim for d in shape_diff(real[0], s, (), f"{path}/*")]
                out += [d for r in real for d in shape_diff(r, sim[0], (), f"{path}/*")]
    return sorted(set(out), key=out.index)


def key_order_diff(real_raw: bytes, sim_raw: bytes, what: str) -> list[str]:
    """Differences in the key order of two JSON lines, at every level."""
    import json

    def orders(raw: bytes) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}

        def walk(value: Any, path: str) -> None:
            if isinstance(value, list) and value and isinstance(value[0], tuple):
                found[path] = [k for k, _ in value]
                for k, v in value:
                    walk(v, f"{path}/{k}")
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    walk(v, f"{path}/{i}")

        walk(json.loads(raw, object_pairs_hook=list), "$")
        return found

    r, s = orders(real_raw), orders(sim_raw)
    return [
        f"{what} {path}: QEMU key order {r[path]} != qmpsim {s[path]}"
        for path in r
        if path in s and set(r[path]) == set(s[path]) and r[path] != s[path]
    ]


# --- /metrics --------------------------------------------------------------------------------

#: labels whose values are machine-specific (dropped from series identities)
MACHINE_LABELS = frozenset({"qemu_version", "package", "uuid", "socket", "node_name", "pid"})
#: metric families not about the VM (the exporter process itself)
IGNORED_PREFIXES = ("process_", "python_", "qemu_exporter_build", "qemu_exporter_scrape")


def _normal(label: str, value: str) -> str:
    """A storage backend keeps its kind (``nbd+unix``), not the machine's socket path."""
    return value.split(":", 1)[0] if label == "backend" else value


def series(m: Metrics, ignore_prefixes: Iterable[str] = IGNORED_PREFIXES) -> dict[str, float]:
    """The exporter's series as ``name{label="value",...}`` (machine-specific labels dropped,
    backends reduced to their kind) mapped to their values; series of ``ignore_prefixes`` are
    left out."""
    prefixes = tuple(ignore_prefixes)
    out: dict[str, float] = {}
    for s in m.samples:
        if s.name.startswith(prefixes):
            continue
        labels = ",".join(
            f'{k}="{_normal(k, v)}"' for k, v in sorted(s.labels.items()) if k not in MACHINE_LABELS
        )
        out[f"{s.name}{{{labels}}}"] = s.value
    return out


def series_set_diff(real: Metrics, sim: Metrics, ignore_prefixes: Iterable[str] = IGNORED_PREFIXES) -> str:
    """A unified diff of the two normalised series sets ('' when they are the same)."""
    r = sorted(series(real, ignore_prefixes))
    s = sorted(series(sim, ignore_prefixes))
    return "\n".join(difflib.unified_diff(r, s, "real QEMU", "qmpsim", lineterm="", n=0))


def value_diff(
    real: Metrics,
    sim: Metrics,
    names: Iterable[str],
    tolerance: dict[str, float] | None = None,
) -> list[str]:
    """Series of the metric ``names`` whose values differ (beyond ``tolerance[name]``)."""
    tol = tolerance or {}
    r, s = series(real), series(sim)
    out = []
    for name in names:
        keys = sorted(k for k in set(r) | set(s) if k.split("{", 1)[0] == name)
        if not keys:
            out.append(f"{name}: no series on either side")
        for k in keys:
            a, b = r.get(k), s.get(k)
            if a is None or b is None or abs(a - b) > tol.get(name, 0.0):
                out.append(f"{k}: QEMU {a} != qmpsim {b}")
    return out
