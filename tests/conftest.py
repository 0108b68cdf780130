"""Shared test helpers.

External binaries (promtool, qemu-system-x86_64, nbdkit, prometheus, alertmanager) are installed
by ``scripts/setup-test.sh``.  A developer without them gets a skip; under ``CI=true`` a missing
binary is a failure, so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def require_binary(name: str) -> str:
    """Return the path of ``name`` or skip (fail under CI=true) when it is not installed."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path:
        return path
    msg = f"{name} is not installed (run scripts/setup-test.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="qih-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
