"""Platform layer: builds of QEMU, libvfio-user and the guest image, and the QEMU launcher."""
