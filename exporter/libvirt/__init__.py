"""The libvirt source: every running domain of a libvirt URI, QEMU's events forwarded by
libvirtd (`source`), handed from libvirt's event thread to the loop in bounded memory
(`inbox`), and the pure parser of a domain's XML: disks, aliases, node names, error policy
(`domxml`).

May import: ``exporter.model``, ``exporter.config``, ``exporter.storage`` and
``exporter.qmp.discovery`` (static labels).  ``import libvirt`` here is the libvirt-python
binding, not this package.
"""
