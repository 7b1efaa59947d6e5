"""Transport layer: the narrow ctypes binding to libvfio-user (vfio-user server side)."""
