"""Fixtures for tests against a real libvirtd (``tests/libvirt/lab.py``).

* ``libvirtd`` (session): a libvirtd started here (``virtlogd -d``, ``libvirtd -d``), by default
  in a private mount namespace so concurrent sessions on one machine never share it; connect
  with ``libvirtd.uri``.  ``QIH_LIBVIRT_LAB=system`` uses the machine's ``qemu:///system``
  instead (reused when it answers).  A daemon started here is stopped at the end.
  ``libvirtd.kill()`` / ``libvirtd.restart()`` crash and restart it while domains keep running.
* ``libvirt_lab`` (function): ``libvirt_lab.domain(DiskOptions(error_policy="stop"))`` defines
  and starts a domain on failing NBD storage; every domain and nbdkit is removed at teardown,
  also when the test fails.

A missing binary skips for a developer and fails under ``CI=true``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.libvirt.lab import Libvirtd, LibvirtLab, lab_workdir, running_libvirtd


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    with lab_workdir("qih-libvirtd-") as workdir, running_libvirtd(workdir) as daemon:
        yield daemon


@pytest.fixture
def libvirt_lab(libvirtd: Libvirtd) -> Iterator[LibvirtLab]:
    libvirtd.revive()  # a previous test killed it and failed before restarting it
    with lab_workdir("qih-lv-") as workdir, contextlib.ExitStack() as stack:
        yield LibvirtLab(libvirtd, workdir, stack)
    libvirtd.revive()
