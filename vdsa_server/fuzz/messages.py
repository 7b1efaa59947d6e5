"""Message fields as hypothesis strategies: mostly the values a handler's checks turn on
(boundaries, sizes one off, overflowing sums, flags one bit beyond the defined ones), some
anything at all."""

from __future__ import annotations

import mmap
import struct

from hypothesis import strategies as st

from vdsa_server.vfio import PciIrq, PciRegion

PAGE = mmap.PAGESIZE
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MAX_DATA_XFER = 1 << 20  # libvfio-user's SERVER_MAX_DATA_XFER_SIZE
# DMA windows the fuzzer maps in: a few pages, so that overlaps are common.
WINDOW = 0x1000_0000
WINDOW_PAGES = 16
MEMFD_PAGES = 8  # the size of each memfd the fuzzer sends with a map

VFIO_PCI_NUM_REGIONS = len(PciRegion)  # with libvfio-user's migration region
VFIO_PCI_NUM_IRQS = len(PciIrq)
CONFIG_REGION = PciRegion.CONFIG


def around(*points: int, top: int) -> st.SearchStrategy[int]:
    """Values at and next to each point, within 0..top."""
    return st.sampled_from(sorted({min(top, max(0, p + d)) for p in points for d in (-1, 0, 1)}))


def u32() -> st.SearchStrategy[int]:
    return st.one_of(around(0, 8, 16, 32, U32, top=U32), st.integers(0, U32))


def u64() -> st.SearchStrategy[int]:
    return st.one_of(around(0, PAGE, U64, top=U64), st.integers(0, U64))


def region_indexes() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, VFIO_PCI_NUM_REGIONS), st.integers(0, U32))


def counts() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 64]),
                     around(MAX_DATA_XFER, top=U32), st.integers(0, U32))


def window_pages() -> st.SearchStrategy[tuple[int, int]]:
    """(first page, page count) inside the DMA window."""
    return st.integers(0, WINDOW_PAGES - 1).flatmap(
        lambda first: st.tuples(st.just(first), st.integers(1, WINDOW_PAGES - first)))


FD_KINDS = ("memfd", "pipe", "eventfd", "devnull")


def fd_lists() -> st.SearchStrategy[list[str]]:
    """The fds a message carries: usually none or one memfd, sometimes garbage or several."""
    return st.one_of(st.just([]), st.just(["memfd"]),
                     st.lists(st.sampled_from(FD_KINDS), min_size=1, max_size=3))


def truncations(payload: bytes) -> st.SearchStrategy[bytes]:
    """The payload, or a cut or stretched copy of it."""
    return st.one_of(st.just(payload), st.integers(0, len(payload)).map(lambda n: payload[:n]),
                     st.binary(min_size=1, max_size=16).map(lambda extra: payload + extra))


def region_access(region: int, offset: int, count: int) -> bytes:
    return struct.pack("<QII", offset, region, count)


def dma_map(argsz: int, flags: int, offset: int, address: int, size: int) -> bytes:
    return struct.pack("<IIQQQ", argsz, flags, offset, address, size)


def dma_unmap(argsz: int, flags: int, address: int, size: int) -> bytes:
    return struct.pack("<IIQQ", argsz, flags, address, size)


def region_info(argsz: int, index: int) -> bytes:
    return struct.pack("<IIIIQQ", argsz, 0, index, 0, 0, 0)


def irq_info(argsz: int, index: int) -> bytes:
    return struct.pack("<IIII", argsz, 0, index, 0)


def set_irqs(argsz: int, flags: int, index: int, start: int, count: int) -> bytes:
    return struct.pack("<IIIII", argsz, flags, index, start, count)
