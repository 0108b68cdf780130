"""The checks on the numbers fed to hang tracking, which the state machine (`exporter.hang.machine`)
and its saved state (`exporter.hang.snapshot`) apply alike: a NaN or infinite timestamp would
poison every comparison after it, so it is refused where it comes in, naming the argument."""

from __future__ import annotations

import math

__all__ = ["finite", "non_negative"]


def finite(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def non_negative(name: str, value: float) -> float:
    v = finite(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v
