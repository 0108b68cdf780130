"""The ``lab`` fixture: every process an end-to-end test launches is started through it and
stopped at teardown, also when the test fails."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.qemu.lab import Lab
from tests.support.binaries import require_binary


@pytest.fixture
async def lab(short_tmp: Path) -> AsyncIterator[Lab]:
    require_binary("qemu-system-x86_64")
    with contextlib.ExitStack() as stack:
        lab = Lab(short_tmp, stack)
        try:
            yield lab
        finally:
            for exp in lab.exporters:
                if exp.proc is not None:
                    exp.stop()
