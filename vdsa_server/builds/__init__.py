"""Builds and the cache: QEMU, libvfio-user, the descriptor engine and the guest image, each
built once per set of inputs.  The lowest layer: it imports no other part of vdsa."""
