"""A QMP simulator of QEMU disks with the openEuler IO-hang retry policy (tests and demo only)."""

from .monitor import HungServer, QMPError
from .spec import DiskSpec, SimConfigError
from .vm import SimVM

__all__ = ["DiskSpec", "HungServer", "QMPError", "SimConfigError", "SimVM"]
