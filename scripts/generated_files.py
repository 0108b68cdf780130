"""Write generated files, or check that the committed ones are up to date.

Shared by alerts/generate.py and dashboards/generate.py (``--check`` in both).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path


def write_or_check(outputs: Mapping[Path, str], *, check: bool, generator: str) -> int:
    """Write every file of ``outputs`` (path -> text); with ``check``, write nothing and report
    the files whose content differs instead.  Returns the exit status: 1 when one is stale."""
    if not check:
        for path, text in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return 0
    stale = [path for path, text in outputs.items() if not path.exists() or path.read_text() != text]
    for path in stale:
        print(f"{path} is out of date: run {generator}", file=sys.stderr)
    return 1 if stale else 0
