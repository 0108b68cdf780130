"""Calling libvirt-python from asyncio: every call blocks, so it runs in a daemon thread of its
own under the source's timeout (`in_thread`), and libvirt's event loop turns in one thread for
the whole process (`ensure_event_loop`).

Kept apart from the source's bookkeeping (`exporter.libvirt.source`) because this is where a
stuck libvirtd is contained: a call that never returns is abandoned, never awaited at exit,
and never delays a scrape or another source.  Also the few calls a worker thread makes
(`all_stats`, `failed_targets`), so their libvirt flags are spelled out in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from exporter.libvirt.translate import paused_on_io_error

T = TypeVar("T")

#: What every poll reads of every domain.
STATS = 0x1 | 0x20  # VIR_DOMAIN_STATS_STATE | VIR_DOMAIN_STATS_BLOCK


class CallFailed(Exception):
    """A libvirt call failed or timed out: the connection is re-opened."""


# --- libvirt's event loop: one thread for the process -------------------------------------

_loop_lock = threading.Lock()
_loop_started = False


def quiet_libvirt_errors() -> None:
    """Stop libvirt-python printing ``libvirt: XML-RPC error : ...`` to stderr for every failed
    call (each reconnect attempt while libvirtd is down): the error is still raised, and logged
    once per state change in the configured log format."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def ensure_event_loop() -> None:
    """libvirt needs an event loop registered before the first connection (for events,
    keepalive and the close callback); it runs in a daemon thread, never on asyncio's."""
    global _loop_started
    import libvirt

    with _loop_lock:
        if _loop_started:
            return
        quiet_libvirt_errors()
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        # A timer keeps the loop turning, so callbacks registered later are picked up promptly.
        libvirt.virEventAddTimeout(1000, lambda _timer, _opaque: None, None)
        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


# --- blocking calls -----------------------------------------------------------------------


def in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` in a new daemon thread; its result (or error) on the running loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def run() -> None:
        try:
            result: Any = fn(*args)
            ok = True
        except BaseException as exc:  # delivered to the awaiting task
            result, ok = exc, False
        with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=run, name="libvirt-call", daemon=True).start()
    return fut


def all_stats(conn: Any) -> list[tuple[str, dict[str, Any]]]:
    """State and block statistics of every running domain: one RPC, whatever the fleet size."""
    got = conn.getAllDomainStats(STATS, 0x1)  # VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
    return [(dom.UUIDString(), stats) for dom, stats in got]


def failed_targets(dom: Any, stats: Mapping[str, Any] | None) -> set[str]:
    """Targets (``vda``) with an IO error, asked only of a domain paused on one (one more
    call; ``virDomainGetDiskErrors`` is read-only and taints nothing)."""
    if not paused_on_io_error(stats):
        return set()
    return {str(target) for target, code in dom.diskErrors().items() if code}


def is_libvirt_error(exc: BaseException) -> bool:
    try:
        import libvirt
    except ImportError:
        return False
    return isinstance(exc, libvirt.libvirtError)


def connect_reason(message: str) -> str:
    """A failed ``open``'s error text as the ``reason`` label of the connect-error counter."""
    text = message.lower()
    if "no such file" in text:
        return "not_found"
    if "connection refused" in text:
        return "refused"
    if "permission denied" in text or "authentication" in text:
        return "permission"
    if "timed out" in text:
        return "timeout"
    return "other"


def close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()
