"""The PCI function the guest sees: identity, BARs and interrupt geometry.

Data only; the transport applies it to libvfio-user's config space.  DSA 1.x
is a root-complex integrated endpoint with a 64-bit BAR0 (registers, MSI-X
table and PBA) and a 64-bit prefetchable BAR2 (the WQ portals).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PCI_VENDOR_ID_INTEL = 0x8086
PCI_DEVICE_ID_INTEL_DSA_SPR0 = 0x0B25  # the id the idxd driver binds as DSA
# Class 0x08 (base system peripheral), subclass 0x80 (other), as DSA reports.
PCI_CLASS_BASE_SYSTEM_PERIPHERAL = 0x08
PCI_SUBCLASS_OTHER = 0x80
PCI_PROG_IF_NONE = 0x00
REVISION_ID = 0x01

# PCI_BASE_ADDRESS_* low bits of a memory BAR.
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08

# PCI_COMMAND bits the device model honours.
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4

PCI_EXP_TYPE_RC_END = 0x9  # root complex integrated endpoint
PCI_EXP_CAP_VERSION = 2

# Device events use vector 0; WQ n completes on vector n + 1 (what idxd expects).
MSIX_VECTOR_DEVICE_EVENTS = 0


class Bar(enum.IntEnum):
    REGISTERS = 0
    PORTALS = 2


@dataclass(frozen=True)
class BarSpec:
    index: Bar
    size: int
    prefetchable: bool

    def __post_init__(self) -> None:
        if self.size & (self.size - 1) or self.size < 4096:
            raise ValueError(f"BAR{int(self.index)} size {self.size:#x} is not a power of two "
                             ">= 4 KiB")

    @property
    def type_bits(self) -> int:
        """The low bits of the BAR register: 64-bit memory, maybe prefetchable."""
        return PCI_BASE_ADDRESS_MEM_TYPE_64 | (PCI_BASE_ADDRESS_MEM_PREFETCH
                                               if self.prefetchable else 0)


@dataclass(frozen=True)
class MsixSpec:
    vectors: int
    table_offset: int
    pba_offset: int
    bar: Bar = Bar.REGISTERS
