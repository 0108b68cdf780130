"""The libvirt source: every running domain of a libvirt URI, QEMU's events forwarded by
libvirtd (`source`), and the pure parser of a domain's XML: disks, aliases, node names, error
policy (`domxml`).

May import: ``exporter.model``, ``exporter.config``, ``exporter.storage`` and
``exporter.qmp.discovery`` (static labels).  ``import libvirt`` here is the libvirt-python
binding, not this package.
"""
