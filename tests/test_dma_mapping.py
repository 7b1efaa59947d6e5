"""DMA_MAP and DMA_UNMAP as the vfio-user specification and VFIO's type1 IOMMU define them,
checked where it matters: what the engine can still reach afterwards.  A translation the
guest removed must be gone from the server's table and the engine's, so a descriptor using it
faults instead of touching memory the guest no longer maps there."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_engine_protocol import (
    BUF_A,
    MAIN,
    Guest,
    connected_guest,
    descriptor,
    noise,
    server_thread,
)
from tests.test_engine_protocol import guest as guest  # the fixture
from vdsa_server.client import GuestMemory, VfioUserError
from vdsa_server.client.protocol import Command, DmaMapFlag, encode_dma_map, encode_dma_unmap
from vdsa_server.device.config import DeviceConfig
from vdsa_server.device.descriptors import DSA_COMP_STATUS_WRITE
from vdsa_server.device.descriptors import DsaCompStatus as S
from vdsa_server.device.descriptors import DsaOpcode as Op

PAGE = mmap.PAGESIZE
PAGES = 0x2000_0000  # IOVAs the tests map page by page, as a vIOMMU guest does
TOP_PAGES = (1 << 64) - (1 << 20)  # two pages here leave the last 1 MiB - 2 pages unmapped
# What VERSION offers as max_dma_maps (patch 0003): since patch 0004 the server takes 1,048,576
# regions, but offers at most the specification's default, 65535, as QEMU refuses a server that
# offers more.
ADVERTISED_DMA_MAPS = 65535


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


def engine_iovas(guest: Guest) -> list[int]:
    """Where the regions the engine translates start, in order: the engine takes the maps
    and unmaps itself, in libvfio-user's DMA callbacks."""
    assert guest.server is not None
    return [region.iova for region in guest.server.engine.dma_regions()]


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
    assert engine_iovas(guest) == [MAIN, *(r.iova for r in regions)]
    # Still mapped once: one unmap removes it; a second finds nothing (type1: success).
    await unmap(guest, regions[1].iova, PAGE)
    await unmap(guest, regions[1].iova, PAGE)
    assert engine_iovas(guest) == [MAIN, regions[0].iova, regions[2].iova]


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
    assert PAGES not in engine_iovas(guest)
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
    assert not set(engine_iovas(guest)) & {r.iova for r in regions}
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


async def test_the_server_says_how_many_maps_it_takes_and_takes_them(guest: Guest) -> None:
    """A vIOMMU guest maps page by page: far more than libvfio-user's 16 regions as shipped.
    The VERSION reply says how many it takes (patch 0003), and many more maps work."""
    assert guest.client.server_version.max_dma_maps == ADVERTISED_DMA_MAPS
    with pages(256) as regions:
        for region in regions:
            await guest.client.dma_map(region)
        for region in (regions[0], regions[100], regions[-1]):
            assert await copy_page(guest, region.iova) == (
                S.SUCCESS, 0, region.read(region.iova, PAGE))


async def test_an_unmap_of_nothing_mapped_succeeds_and_removes_nothing(guest: Guest) -> None:
    """As type1 answers it: QEMU unmaps whole address spaces when a vIOMMU switches."""
    await unmap(guest, PAGES, PAGE)
    await unmap(guest, 0, MAIN)  # everything below the guest's memory
    assert guest.server is not None
    assert engine_iovas(guest) == [MAIN]


async def test_an_unmap_may_end_at_the_top_of_the_address_space(guest: Guest) -> None:
    """QEMU's unmap at power-off: [0xfef00000, 2^64), with size 2^64 - iova. One that goes past
    the top is refused and removes nothing."""
    top = 1 << 64
    with pages(2, at=TOP_PAGES) as regions:
        for region in regions:
            await guest.client.dma_map(region)
        with pytest.raises(VfioUserError) as past:
            await unmap(guest, TOP_PAGES + PAGE, top - TOP_PAGES)
        assert past.value.errno == errno.EINVAL
        assert guest.server is not None
        assert engine_iovas(guest) == [MAIN, *(r.iova for r in regions)]
        await unmap(guest, TOP_PAGES, top - TOP_PAGES)
        assert engine_iovas(guest) == [MAIN]


# --- Any sequence: the server's replies follow type1's rules, and the engine reaches exactly
# --- what is mapped ---------------------------------------------------------------------------

WINDOW = 8  # pages, at PAGES


@dataclass
class Type1Model:
    """The regions mapped in the window, as (first page, page count) -> their memory."""

    regions: dict[tuple[int, int], GuestMemory] = field(default_factory=dict)

    def map_errno(self, first: int, count: int) -> int:
        overlaps = any(first < f + c and f < first + count for f, c in self.regions)
        return errno.EEXIST if overlaps else 0

    def unmap_errno(self, first: int, count: int) -> int:
        inside = [(f, c) for f, c in self.regions if first <= f and f + c <= first + count]
        cut = [(f, c) for f, c in self.regions
               if first < f + c and f < first + count and (f, c) not in inside]
        return errno.EINVAL if cut else 0

    def removed_by(self, first: int, count: int) -> list[tuple[int, int]]:
        return [(f, c) for f, c in self.regions if first <= f and f + c <= first + count]

    def page(self, page: int) -> bytes | None:
        """What a read of this page must return, None if it must fault."""
        for (f, c), memory in self.regions.items():
            if f <= page < f + c:
                iova = PAGES + page * PAGE
                return memory.read(iova, PAGE)
        return None


operations = st.lists(
    st.tuples(st.sampled_from(["map", "unmap"]), st.integers(0, WINDOW - 1),
              st.integers(1, WINDOW)).map(lambda op: (op[0], op[1], min(op[2], WINDOW - op[1]))),
    min_size=1, max_size=12)


async def replied_errno(request: Awaitable[object]) -> int:
    try:
        await request
    except VfioUserError as refused:
        return refused.errno or -1
    return 0


@settings(max_examples=100, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(sequence=operations, seed=st.integers(0, 2**16))
def test_any_map_unmap_sequence_leaves_the_engine_reaching_exactly_what_is_mapped(
        tmp_path_factory: pytest.TempPathFactory, sequence: list[tuple[str, int, int]],
        seed: int) -> None:
    """Each example has a server and a guest of its own (pytest-trio cannot give hypothesis'
    examples an async fixture): one trio run each."""
    socket = tmp_path_factory.mktemp("dma") / "dsa.sock"

    async def example() -> None:
        async with server_thread(socket, DeviceConfig()) as server, \
                connected_guest(socket, server) as guest:
            await check_sequence(guest, sequence, seed)

    trio.run(example)


async def check_sequence(guest: Guest, sequence: list[tuple[str, int, int]], seed: int) -> None:
    model = Type1Model()
    with ExitStack() as stack:
        for number, (operation, first, count) in enumerate(sequence):
            iova, size = PAGES + first * PAGE, count * PAGE
            if operation == "map":
                memory = stack.enter_context(GuestMemory(iova, size))
                memory.write(iova, noise(size, seed + number))
                expected = model.map_errno(first, count)
                assert await replied_errno(guest.client.dma_map(memory)) == expected
                if not expected:
                    model.regions[first, count] = memory
            else:
                expected = model.unmap_errno(first, count)
                assert await replied_errno(unmap(guest, iova, size)) == expected
                for gone in model.removed_by(first, count) if not expected else []:
                    del model.regions[gone]
            assert engine_iovas(guest) == sorted(
                [MAIN, *(PAGES + f * PAGE for f, _ in model.regions)])
            for page in range(WINDOW):
                status, fault, arrived = await copy_page(guest, PAGES + page * PAGE)
                content = model.page(page)
                if content is None:
                    assert (status, fault) == (S.PAGE_FAULT_NOBOF, PAGES + page * PAGE)
                else:
                    assert (status, arrived) == (S.SUCCESS, content)


# --- Regions of several files and prots: libvfio-user shares one mapping per file and prot, and
# --- each region must still reach only its own file's pages, only as its prot allows ---------

FILES = 3
FILE_PAGES = WINDOW
PROTS = [DmaMapFlag.READ, DmaMapFlag.WRITE, DmaMapFlag.READ | DmaMapFlag.WRITE]


@dataclass(frozen=True)
class FileRegion:
    first: int  # window page
    count: int
    file: int
    offset: int  # the file page at its first page
    flags: DmaMapFlag

    def file_page(self, page: int) -> int | None:
        return self.offset + page - self.first if self.first <= page < self.first + self.count \
            else None


file_operations = st.lists(
    st.tuples(st.booleans(), st.integers(0, WINDOW - 1), st.integers(1, 3),
              st.integers(0, FILES - 1), st.integers(0, FILE_PAGES - 1), st.sampled_from(PROTS)),
    min_size=1, max_size=10)


@settings(max_examples=50, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(sequence=file_operations)
def test_regions_of_several_files_and_prots_reach_only_their_own_pages(
        tmp_path_factory: pytest.TempPathFactory,
        sequence: list[tuple[bool, int, int, int, int, DmaMapFlag]]) -> None:
    """Maps of pages of three files with every prot, interleaved, and unmaps: after each, every
    page of the window is read and written by descriptor.  A read reaches the region's own file
    page, a write lands there and nowhere else, and a region without the right faults."""
    socket = tmp_path_factory.mktemp("dma") / "dsa.sock"

    async def example() -> None:
        async with server_thread(socket, DeviceConfig()) as server, \
                connected_guest(socket, server) as guest:
            await check_file_sequence(guest, sequence)

    trio.run(example)


async def check_file_sequence(guest: Guest,
                              sequence: list[tuple[bool, int, int, int, int, DmaMapFlag]]
                              ) -> None:
    regions: dict[int, FileRegion] = {}
    with ExitStack() as stack:
        files = [stack.enter_context(GuestMemory(0, FILE_PAGES * PAGE, name=f"vdsa-file-{n}"))
                 for n in range(FILES)]
        for n, memory in enumerate(files):
            memory.write(0, noise(FILE_PAGES * PAGE, 50 + n))
        expected = [bytearray(memory.read(0, FILE_PAGES * PAGE)) for memory in files]
        for step, (unmapping, first, count, file, offset, flags) in enumerate(sequence):
            count = min(count, WINDOW - first, FILE_PAGES - offset)
            owner = next((r for r in regions.values() if r.file_page(first) is not None), None)
            if unmapping:
                if owner is None:
                    continue
                await unmap(guest, PAGES + owner.first * PAGE, owner.count * PAGE)
                del regions[owner.first]
            else:
                region = FileRegion(first, count, file, offset, flags)
                overlaps = any(r.file_page(p) is not None for r in regions.values()
                               for p in range(first, first + count))
                assert await replied_errno(guest.client.request(
                    Command.DMA_MAP,
                    encode_dma_map(PAGES + first * PAGE, count * PAGE, flags, offset * PAGE),
                    fds=[files[file].fd])) == (errno.EEXIST if overlaps else 0)
                if not overlaps:
                    regions[first] = region
            for page in range(WINDOW):
                await check_page(guest, regions, files, expected, page, step)


async def check_page(guest: Guest, regions: dict[int, FileRegion], files: list[GuestMemory],
                     expected: list[bytearray], page: int, step: int) -> None:
    iova = PAGES + page * PAGE
    owner = next((r for r in regions.values() if r.file_page(page) is not None), None)
    at = None if owner is None else owner.file_page(page)
    status, fault, arrived = await copy_page(guest, iova)
    if owner is not None and at is not None and owner.flags & DmaMapFlag.READ:
        assert (status, arrived) == (S.SUCCESS, bytes(expected[owner.file][at * PAGE:
                                                                          (at + 1) * PAGE]))
    else:
        assert (status, fault) == (S.PAGE_FAULT_NOBOF, iova)
    pattern = ((step * WINDOW + page) % 255 + 1) * 0x0101_0101_0101_0101  # a byte of its own
    record = await guest.run(descriptor(Op.MEMFILL, pattern=pattern, dst_addr=iova,
                                        xfer_size=PAGE))
    if owner is not None and at is not None and owner.flags & DmaMapFlag.WRITE:
        assert record.status == S.SUCCESS
        expected[owner.file][at * PAGE:(at + 1) * PAGE] = pattern.to_bytes(8, "little") * (
            PAGE // 8)
    else:
        assert (record.status, record.fault_addr) == (
            S.PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE, iova)
    for memory, contents in zip(files, expected, strict=True):
        assert memory.read(0, FILE_PAGES * PAGE) == contents


# --- Refusals cost nothing ------------------------------------------------------------------------


async def footprint(guest: Guest, name: str) -> tuple[int, int]:
    """This process's open fds (the server's thread runs here) and its mappings of the memfd
    called ``name``, once the server has finished with the last message: libvfio-user closes a
    message's fds after sending its reply, so the reply alone does not say they are closed, but
    it handles one message at a time, so the reply to the next one does."""
    await guest.client.device_get_info()
    return open_fds_and_mappings(name)


def open_fds_and_mappings(name: str) -> tuple[int, int]:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return len(os.listdir("/proc/self/fd")), sum(f"/memfd:{name} " in line for line in maps)


async def test_a_refused_map_leaves_no_fd_or_mapping_behind(
        mapped: tuple[Guest, list[GuestMemory]]) -> None:
    guest, regions = mapped
    name = "vdsa-refused"
    with GuestMemory(PAGES + 16 * PAGE, 2 * PAGE, name=name) as memory, \
            GuestMemory(PAGES + 16 * PAGE, PAGE) as other:
        before = await footprint(guest, name)
        refusals = [
            (encode_dma_map(regions[1].iova, PAGE, 3), [memory.fd], errno.EEXIST),
            (encode_dma_map(regions[2].iova - PAGE, 2 * PAGE, 3), [memory.fd], errno.EEXIST),
            (encode_dma_map(memory.iova, 2 * PAGE, 3, PAGE), [memory.fd], errno.EINVAL),
            (encode_dma_map(memory.iova, 0, 3), [memory.fd], errno.EINVAL),
            (encode_dma_map(memory.iova, PAGE, 3), [memory.fd, other.fd], errno.EINVAL),
        ]
        for payload, fds, refused in refusals:
            assert await replied_errno(
                guest.client.request(Command.DMA_MAP, payload, fds=fds)) == refused
            assert await footprint(guest, name) == before
        # The control: a map that is taken costs the fd and the mapping counted here.
        await guest.client.dma_map(memory)
        assert await footprint(guest, name) == (before[0] + 1, before[1] + 1)
        await unmap(guest, memory.iova, memory.size)
        assert await footprint(guest, name) == before
