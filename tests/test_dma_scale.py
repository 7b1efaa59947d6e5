"""A vIOMMU guest's scale: 1 GiB of guest RAM mapped page by page, 262,144 DMA regions of one
memfd, through the real `vdsa serve` (libvfio-user and the engine), in descending IOVA order as
Linux allocates IOVAs.  Regions of one file share its fd and its mapping (libvfio-user patch
0004): the server must hold a handful of fds and mappings more, not one of each per page, and
give every one of them back when one covering unmap removes the lot."""

from __future__ import annotations

import mmap
import random
import time
from dataclasses import dataclass
from pathlib import Path

from tests.test_dma_mapping import ADVERTISED_DMA_MAPS, copy_page, unmap
from tests.test_engine_protocol import connected_guest, noise, server_process
from vdsa_server.bench.serving import sample_process
from vdsa_server.client import GuestMemory
from vdsa_server.client.protocol import Command, DmaMapFlag, encode_dma_map
from vdsa_server.device.descriptors import DsaCompStatus as S
from vdsa_server.log import get_logger

log = get_logger()

PAGE = mmap.PAGESIZE
COUNT = 262_144  # 1 GiB of 4 KiB pages
SCALE = 0x1_0000_0000  # the first page's IOVA, above the other tests' memory
STRIDE = 40_503  # odd: page -> page * STRIDE mod COUNT permutes the file's pages
MEMFD = "vdsa-scale-ram"
SAMPLES = 24  # pages read back by descriptor
HANDFUL = 4  # more fds the server may hold while the pages are mapped
# Anonymous mappings the server's allocators may add for 262,144 regions' bookkeeping (Python
# objects, libvfio-user's slots, the engine's tree); nothing near one a page.
BOOKKEEPING_MAPPINGS = 256
# The covering unmap runs 262,144 unregister callbacks in the server before it replies.
UNMAP_WAIT = 120.0


def file_page(page: int) -> int:
    """The file page that IOVA page ``page`` maps: scattered, so that each region's offset into
    the shared mapping matters."""
    return page * STRIDE % COUNT


@dataclass(frozen=True)
class Footprint:
    fds: int
    ram_mappings: int  # mappings of the guest-RAM memfd
    mappings: int
    rss_mib: float  # reported, not judged: the sanitizers' quarantine holds freed memory


def footprint(pid: int) -> Footprint:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    sample = sample_process(pid)
    return Footprint(sample.open_fds, sum(MEMFD in line for line in maps), len(maps),
                     round(sample.rss_bytes / (1 << 20), 1))


async def test_a_gib_of_pages_of_one_memfd_costs_one_fd_and_one_mapping(tmp_path: Path) -> None:
    socket = tmp_path / "dsa.sock"
    samples = [0, COUNT - 1, *random.Random(0).sample(range(1, COUNT - 1), SAMPLES - 2)]
    async with server_process(socket, tmp_path / "server.log") as server, \
            connected_guest(socket, None) as guest:
        # QEMU takes no more than 65535 offered, and does not count what it sends.
        assert guest.client.server_version.max_dma_maps == ADVERTISED_DMA_MAPS < COUNT
        with GuestMemory(0, COUNT * PAGE, name=MEMFD) as ram:
            for page in samples:
                ram.write(file_page(page) * PAGE, noise(PAGE, page))
            before = footprint(server.pid)

            started = time.monotonic()
            replies = await guest.client.request_many(
                Command.DMA_MAP,
                (encode_dma_map(SCALE + page * PAGE, PAGE, DmaMapFlag.READ | DmaMapFlag.WRITE,
                                file_page(page) * PAGE) for page in reversed(range(COUNT))),
                fds=[ram.fd])
            mapped = time.monotonic() - started
            assert replies == [0] * COUNT

            during = footprint(server.pid)
            assert before.fds <= during.fds <= before.fds + HANDFUL
            assert during.ram_mappings == before.ram_mappings + 1
            assert during.mappings <= before.mappings + BOOKKEEPING_MAPPINGS
            for page in samples:
                assert await copy_page(guest, SCALE + page * PAGE) == (
                    S.SUCCESS, 0, noise(PAGE, page))

            guest.client.request_timeout = UNMAP_WAIT
            started = time.monotonic()
            await unmap(guest, SCALE, COUNT * PAGE)
            unmapped = time.monotonic() - started

            after = footprint(server.pid)
            assert (after.fds, after.ram_mappings) == (before.fds, before.ram_mappings)
            assert after.mappings <= before.mappings + BOOKKEEPING_MAPPINGS
            for page in samples[:2]:
                status, fault, _ = await copy_page(guest, SCALE + page * PAGE)
                assert (status, fault) == (S.PAGE_FAULT_NOBOF, SCALE + page * PAGE)
            log.info("dma_scale.done", maps=COUNT, map_seconds=round(mapped, 1),
                     unmap_seconds=round(unmapped, 1), fds=(before.fds, during.fds, after.fds),
                     mappings=(before.mappings, during.mappings, after.mappings),
                     rss_mib=(before.rss_mib, during.rss_mib, after.rss_mib))
