"""The open-file limit: every watched QMP socket is a file descriptor, and so is every scrape.

systemd starts services with a soft limit of 1024 open files (hard 524288), and Python, unlike
Go (node_exporter raises its own soft limit at start), keeps it: a host of 1000 VMs would run
out, and then a scrape's connection could not be accepted either.  So the exporter raises its
soft limit to the hard one when it starts (`raise_soft_limit`), and never holds more QMP
sessions than the limit leaves room for beside `FD_RESERVE` (`session_budget`): the sockets
beyond it are shown down with reason ``fd_limit`` (and a log line saying what to raise) rather
than taking the descriptors scrapes need.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("exporter")

#: The reason (connect-error label, status page) of a VM not watched, or not connected, for
#: want of descriptors.
FD_LIMIT = "fd_limit"

#: Descriptors kept for everything but QMP sessions: scrapes and other HTTP clients, libvirt,
#: the hang state file, logs, the event loop's own.
FD_RESERVE = 100


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force.

    Not being allowed to (a seccomp filter denying ``setrlimit``) is logged, not fatal."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and soft >= hard):
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-file limit", extra={"soft": soft, "hard": hard, "err": str(exc)})
        return soft
    log.debug("open-file limit raised", extra={"from": soft, "to": hard})
    return hard


def session_budget(soft_limit: int | None = None) -> int:
    """How many QMP sessions the open-file limit leaves room for."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if soft_limit is None else soft_limit
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft - FD_RESERVE)
