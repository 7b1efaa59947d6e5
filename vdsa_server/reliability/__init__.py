"""Reliability runs against `vdsa serve` in its own process: fault cycles (QEMU killed with
descriptors in flight, guests reset under a busy WQ, vfio-user clients killed mid-stream) and
the soak (hours of verified work while the server's memory and fds are sampled)."""
