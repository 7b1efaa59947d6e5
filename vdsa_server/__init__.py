"""vdsa: a virtual Intel Data Streaming Accelerator for QEMU guests over vfio-user."""

__version__ = "0.1.0"
