"""DMA_MAP and DMA_UNMAP as the vfio-user specification and VFIO's type1 IOMMU define them,
checked where it matters: what the engine can still reach afterwards.  A translation the
guest removed must be gone from the server's table and the engine's, so a descriptor using it
faults instead of touching memory the guest no longer maps there."""

from __future__ import annotations

import errno
import mmap
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager

import pytest

from tests.test_engine_protocol import (
    BUF_A,
    MAIN,
    Guest,
    descriptor,
    noise,
)
from tests.test_engine_protocol import guest as guest  # the fixture
from vdsa_server.client import GuestMemory, VfioUserError
from vdsa_server.client.protocol import Command, encode_dma_map, encode_dma_unmap
from vdsa_server.device.descriptors import DsaCompStatus as S
from vdsa_server.device.descriptors import DsaOpcode as Op

PAGE = mmap.PAGESIZE
PAGES = 0x2000_0000  # IOVAs the tests map page by page, as a vIOMMU guest does


@contextmanager
def pages(count: int, at: int = PAGES) -> Iterator[list[GuestMemory]]:
    """``count`` adjacent one-page regions, each of its own memfd and with its own bytes."""
    with ExitStack() as stack:
        regions = [stack.enter_context(GuestMemory(at + i * PAGE, PAGE)) for i in range(count)]
        for index, region in enumerate(regions):
            region.write(region.iova, noise(PAGE, 10 + index))
        yield regions


async def unmap(guest: Guest, iova: int, size: int) -> None:
    await guest.client.request(Command.DMA_UNMAP, encode_dma_unmap(iova, size))


async def copy_page(guest: Guest, src: int) -> tuple[int, int, bytes]:
    """Copy one page from ``src`` into BUF_A: the record's status and fault address, and
    what arrived."""
    guest.memory.write(BUF_A, bytes(PAGE))
    record = await guest.run(descriptor(Op.MEMMOVE, src_addr=src, dst_addr=BUF_A,
                                        xfer_size=PAGE))
    return record.status, record.fault_addr, guest.memory.read(BUF_A, PAGE)


@pytest.fixture
async def mapped(guest: Guest) -> AsyncIterator[tuple[Guest, list[GuestMemory]]]:
    with pages(3) as regions:
        for region in regions:
            await guest.client.dma_map(region)
        yield guest, regions


async def test_a_second_map_of_the_same_range_is_refused(
        mapped: tuple[Guest, list[GuestMemory]]) -> None:
    guest, regions = mapped
    with pytest.raises(VfioUserError) as refused:
        await guest.client.dma_map(regions[1])
    assert refused.value.errno == errno.EEXIST
    assert guest.server is not None
    assert sorted(guest.server.dma_regions) == [MAIN, *(r.iova for r in regions)]
    # Still mapped once: one unmap removes it, and it cannot be removed twice.
    await unmap(guest, regions[1].iova, PAGE)
    with pytest.raises(VfioUserError) as gone:
        await unmap(guest, regions[1].iova, PAGE)
    assert gone.value.errno == errno.ENOENT


async def test_a_map_over_part_of_a_region_is_refused(
        mapped: tuple[Guest, list[GuestMemory]]) -> None:
    guest, regions = mapped
    with GuestMemory(regions[0].iova - PAGE, 2 * PAGE) as straddling, \
            pytest.raises(VfioUserError) as refused:
        await guest.client.dma_map(straddling)
    assert refused.value.errno == errno.EEXIST
    assert await copy_page(guest, regions[0].iova) == (S.SUCCESS, 0,
                                                       regions[0].read(regions[0].iova, PAGE))


async def test_a_map_with_two_fds_is_refused(guest: Guest) -> None:
    with GuestMemory(PAGES, PAGE) as first, GuestMemory(PAGES, PAGE) as second, \
            pytest.raises(VfioUserError) as refused:
        await guest.client.request(
            Command.DMA_MAP, encode_dma_map(PAGES, PAGE, 3), fds=[first.fd, second.fd])
    assert refused.value.errno == errno.EINVAL
    assert guest.server is not None
    assert PAGES not in guest.server.dma_regions
    status, fault, _ = await copy_page(guest, PAGES)
    assert (status, fault) == (S.PAGE_FAULT_NOBOF, PAGES)


@pytest.mark.parametrize("size", [0, (1 << 64) - PAGE])
async def test_a_map_of_nothing_or_past_the_address_space_is_refused(guest: Guest,
                                                                     size: int) -> None:
    with GuestMemory(PAGES, PAGE) as memory, pytest.raises(VfioUserError) as refused:
        await guest.client.request(Command.DMA_MAP, encode_dma_map(PAGES, size, 3),
                                   fds=[memory.fd])
    assert refused.value.errno == errno.EINVAL


async def test_an_unmap_covering_several_regions_removes_every_translation(
        mapped: tuple[Guest, list[GuestMemory]]) -> None:
    """QEMU's intel-iommu invalidates power-of-two ranges: here 4 pages over 3 maps."""
    guest, regions = mapped
    middle = regions[1].iova
    assert await copy_page(guest, middle) == (S.SUCCESS, 0, regions[1].read(middle, PAGE))
    await unmap(guest, PAGES, 4 * PAGE)
    assert guest.server is not None
    assert not set(guest.server.dma_regions) & {r.iova for r in regions}
    for region in regions:
        status, fault, arrived = await copy_page(guest, region.iova)
        assert (status, fault, arrived) == (S.PAGE_FAULT_NOBOF, region.iova, bytes(PAGE))
    # The IOVA reused for another page reaches that page, never the old one.
    with GuestMemory(middle, PAGE) as reused:
        reused.write(middle, noise(PAGE, 99))
        await guest.client.dma_map(reused)
        assert await copy_page(guest, middle) == (S.SUCCESS, 0, noise(PAGE, 99))


async def test_an_unmap_that_would_cut_a_region_removes_nothing(guest: Guest) -> None:
    with GuestMemory(PAGES, 2 * PAGE) as region, pages(1, at=PAGES + 2 * PAGE) as after:
        region.write(PAGES, noise(2 * PAGE, 5))
        await guest.client.dma_map(region)
        await guest.client.dma_map(after[0])
        # Covers the whole of `after` but only half of `region`.
        with pytest.raises(VfioUserError) as refused:
            await unmap(guest, PAGES + PAGE, 2 * PAGE)
        assert refused.value.errno == errno.EINVAL
        assert await copy_page(guest, PAGES + PAGE) == (S.SUCCESS, 0, noise(2 * PAGE, 5)[PAGE:])
        assert await copy_page(guest, after[0].iova) == (
            S.SUCCESS, 0, after[0].read(after[0].iova, PAGE))


async def test_an_unmap_of_nothing_mapped_is_refused(guest: Guest) -> None:
    with pytest.raises(VfioUserError) as refused:
        await unmap(guest, PAGES, PAGE)
    assert refused.value.errno == errno.ENOENT
