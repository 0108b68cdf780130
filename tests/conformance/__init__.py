"""Conformance of the QMP simulator (qmpsim) to a real QEMU 7.2 where the two overlap."""
