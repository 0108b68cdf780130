"""How many bytes wait unread in a socket's kernel buffer (``FIONREAD``).

One implementation for both of its readers: the QMP reader's stream position
(`exporter.qmp.readonly.ReadOnlyQMPClient.read_through`, asked for every VM at every tick and
scrape) and the stalled-reader detection behind /healthz (`exporter.runtime.liveness`).  It
allocates nothing: in a storm the per-call buffer was 2.5 % of the exporter's CPU.  Not
thread-safe: the event loop's thread only.
"""

from __future__ import annotations

import array
import fcntl
import termios

#: The ioctl's buffer: one for all callers (the event loop's thread only).
_BUF = array.array("i", [0])


def fionread(fd: int) -> int:
    """Bytes waiting unread in the kernel buffer of socket ``fd``; 0 if it is gone."""
    try:
        fcntl.ioctl(fd, termios.FIONREAD, _BUF)
    except OSError:
        return 0
    return _BUF[0]
