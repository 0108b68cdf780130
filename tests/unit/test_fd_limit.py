"""`exporter.runtime.fd_limit`: the session budget, and running out of descriptors as a reason of its own."""

from __future__ import annotations

import errno
import resource

from qemu.qmp import ConnectError

from exporter.qmp.failures import connect_error_reason
from exporter.runtime.fd_limit import FD_LIMIT, FD_RESERVE, session_budget


def test_the_budget_keeps_the_reserve() -> None:
    assert session_budget(1024) == 1024 - FD_RESERVE
    assert session_budget(FD_RESERVE) == 1  # always try one
    assert session_budget(resource.RLIM_INFINITY) >= 1 << 30


def test_out_of_descriptors_is_its_own_reason() -> None:
    for code in (errno.EMFILE, errno.ENFILE):
        exc = OSError(code, "Too many open files")
        assert connect_error_reason(exc) == FD_LIMIT
        assert connect_error_reason(ConnectError("Failed to establish connection", exc)) == FD_LIMIT
    assert connect_error_reason(OSError(errno.EIO, "I/O error")) == "other"
