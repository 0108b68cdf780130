"""The source-neutral model: what is known about each VM, its disks' policy, and the typed
events every source (a QMP socket, libvirt) turns its input into.

Sources import from here; the model, hang tracking and metrics never see a raw QMP message, a
socket path or a libvirt object.
"""
