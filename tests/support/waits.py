"""Waiting: poll a condition against a deadline, never sleep a fixed time and hope.

`wait_for` (async) and `wait_until` (sync) behave alike: they return the first result of
``check`` that is truthy, remember an AssertionError raised by ``check`` as the last failure,
and raise `WaitTimeout` once ``timeout`` seconds have gone by.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """A condition did not hold in time: a test failure to pytest, a TimeoutError to a script."""


class _Deadline:
    def __init__(self, timeout: float, what: str) -> None:
        self.timeout, self.what = timeout, what
        self.end = time.monotonic() + timeout
        self.last: AssertionError | None = None

    def check(self) -> None:
        if time.monotonic() > self.end:
            last = f" (last: {self.last})" if self.last is not None else ""
            raise WaitTimeout(f"timed out after {self.timeout:g} s waiting for {self.what}{last}")


async def wait_for(
    check: Callable[[], Awaitable[T | None]],
    timeout: float = 10.0,
    what: str = "condition",
    step: float = 0.05,
) -> T:
    """Await ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = _Deadline(timeout, what)
    while True:
        try:
            result = await check()
        except AssertionError as exc:
            result, deadline.last = None, exc
        if result:
            return result
        deadline.check()
        await asyncio.sleep(step)


def wait_until(
    check: Callable[[], T | None], timeout: float = 10.0, what: str = "condition", step: float = 0.05
) -> T:
    """Call ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = _Deadline(timeout, what)
    while True:
        try:
            result = check()
        except AssertionError as exc:
            result, deadline.last = None, exc
        if result:
            return result
        deadline.check()
        time.sleep(step)
