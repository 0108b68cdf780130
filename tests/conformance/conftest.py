"""Fixtures of the conformance tests: the end-to-end ``lab`` (real QEMU, nbdkit, exporter)."""

from tests.e2e.conftest import lab

__all__ = ["lab"]
