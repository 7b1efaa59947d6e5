"""VFIO's PCI region and interrupt indices: the vocabulary vfio-user shares
with VFIO (``VFIO_PCI_*_REGION_INDEX``, ``VFIO_PCI_*_IRQ_INDEX``), used by both
the server's binding and the client harness."""

from __future__ import annotations

import enum


class PciRegion(enum.IntEnum):
    """``VFIO_PCI_*_REGION_INDEX``; MIGRATION is libvfio-user's ``VFU_PCI_DEV_MIGR_REGION_IDX``."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8
    MIGRATION = 9


class PciIrq(enum.IntEnum):
    """``VFIO_PCI_*_IRQ_INDEX``."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4
