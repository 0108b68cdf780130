"""Exporter configs for tests and benchmarks: interval presets and one builder.

exporter_config(d / "vm.qmp", intervals=FAST)          # {"qmp": {"sockets": [...], ...}}
exporter_config(globs=[d / "*.qmp"], log_level="info")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Simulated VMs (qmpsim, in-process fakes): they answer at once, so everything is short.
FAST: dict[str, Any] = {
    "discovery_interval_seconds": 0.2,
    "poll_interval_seconds": 0.5,
    "refresh_interval_seconds": 2.0,
    "connect_timeout_seconds": 2.0,
    "command_timeout_seconds": 2.0,
    "backoff_initial_seconds": 0.1,
    "backoff_max_seconds": 0.5,
}

#: The fault suite: a fault (silence, a slow reply) is noticed within a second or two.
FAULT_FAST: dict[str, Any] = FAST | {
    "poll_interval_seconds": 0.3,
    "connect_timeout_seconds": 1.0,
    "command_timeout_seconds": 1.0,
    "backoff_max_seconds": 0.3,
}

#: A real QEMU (TCG on a shared machine): slower to answer, so longer timeouts.
REAL_QEMU: dict[str, Any] = {
    "poll_interval_seconds": 0.5,
    "refresh_interval_seconds": 5.0,
    "discovery_interval_seconds": 0.5,
    "command_timeout_seconds": 5.0,
}


def exporter_config(
    *sockets: str | Path,
    globs: Iterable[str | Path] = (),
    intervals: Mapping[str, Any] = FAST,
    log_level: str | None = None,
    **qmp: Any,
) -> dict[str, Any]:
    """The exporter's config: ``qmp.sockets`` (watched even while missing) and ``qmp.globs``,
    the ``intervals`` preset with ``qmp`` on top, and ``log.level`` when given."""
    section: dict[str, Any] = {**intervals, **qmp}
    if sockets:
        section["sockets"] = [str(s) for s in sockets]
    if globs:
        section["globs"] = [str(g) for g in globs]
    cfg: dict[str, Any] = {"qmp": section}
    if log_level is not None:
        cfg["log"] = {"level": log_level}
    return cfg
