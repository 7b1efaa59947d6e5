"""Launch: QEMU with a vfio-user device, the guest, its console, and libvfio-user's sample
servers.  Above the server: it may start one for a boot."""
