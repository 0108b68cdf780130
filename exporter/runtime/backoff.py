"""Capped exponential backoff with jitter: how both sources retry a connection that failed.

A QMP socket that refuses and a libvirtd that restarts are retried the same way: the first try
at once... then after a delay drawn from ``[b/2, b]``, ``b`` doubling from the initial value up
to the maximum, back to the initial value once a session got established.  The jitter spreads
the retries of a thousand VMs whose QEMUs went away together.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """The delays before each retry (`next_delay`), reset by a success (`reset`).  No clock and
    no sleep of its own: the caller waits, so that it can be woken early."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._uniform = uniform
        self._current = initial

    def reset(self) -> None:
        """A session got established: the next failure is retried quickly again."""
        self._current = self.initial

    def next_delay(self) -> float:
        """The delay before the next try, within ``[b/2, b]``; ``b`` doubles for the one after."""
        delay = self._uniform(self._current / 2, self._current)
        self._current = min(self._current * 2, self.maximum)
        return delay
