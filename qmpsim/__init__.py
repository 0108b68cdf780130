"""A QMP simulator of QEMU disks with the openEuler IO-hang retry policy (tests and demo only)."""
