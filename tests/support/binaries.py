"""Real binaries (installed by ``scripts/setup-test.sh``): find them, or skip / fail.

A developer without a binary gets a skip; under ``CI=true`` a missing binary is a failure, so
CI can never go green by skipping.  Scripts (bench/) use `find_binary` and decide themselves.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

#: Looked in after PATH: Debian puts daemons in /usr/sbin, which a non-root PATH lacks.
_SYSTEM_DIRS = ("/usr/sbin", "/usr/bin")


def env_ci() -> bool:
    return os.environ.get("CI") == "true"


def skip_or_fail(msg: str) -> NoReturn:
    """What a missing prerequisite means: a skip for a developer, a failure under ``CI=true``."""
    if env_ci():
        pytest.fail(msg)
    pytest.skip(msg)


def find_binary(*names: str) -> str | None:
    """The first of ``names`` found on PATH or in /usr/sbin, /usr/bin; None when none is."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
        for d in _SYSTEM_DIRS:
            if os.access(os.path.join(d, name), os.X_OK):
                return os.path.join(d, name)
    return None


def require_binary(*names: str) -> str:
    """The path of the first of ``names`` installed; skip (fail under CI=true) when none is."""
    path = find_binary(*names)
    if path:
        return path
    skip_or_fail(f"{' or '.join(names)} is not installed (run scripts/setup-test.sh)")


def alertmanager_binary() -> str:
    """Debian's ``prometheus-alertmanager``, or upstream's ``alertmanager``."""
    return require_binary("prometheus-alertmanager", "alertmanager")
