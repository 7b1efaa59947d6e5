"""A vfio-user client harness of our own: drives a vfio-user server without QEMU, in tests and
benchmarks.  It speaks the protocol itself (not through libvfio-user), so that it can check
vdsa's libvfio-user-based server independently and send malformed messages on purpose."""

from vdsa_server.client.client import (
    ConnectionClosed,
    GuestMemory,
    IrqEventfd,
    Message,
    ServedDma,
    VfioUserClient,
    VfioUserClientError,
    VfioUserError,
    VfioUserTimeout,
)
from vdsa_server.client.protocol import Command, ProtocolError
from vdsa_server.vfio import PciIrq, PciRegion

__all__ = [
    "Command",
    "ConnectionClosed",
    "GuestMemory",
    "IrqEventfd",
    "Message",
    "PciIrq",
    "PciRegion",
    "ProtocolError",
    "ServedDma",
    "VfioUserClient",
    "VfioUserClientError",
    "VfioUserError",
    "VfioUserTimeout",
]
