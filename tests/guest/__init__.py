"""Tiny guests for real-QEMU tests, built from Python without an assembler."""
